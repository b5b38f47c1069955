//! The report's HTML page: one self-contained file (no external requests) with the tables,
//! the paired comparisons, the plots, the qualitative grid, the loss curves and a grid of
//! generated samples, every image embedded as a base64 `data:` URI (plots and the qualitative
//! grid as PNG, sample thumbnails as JPEG).

use super::compare::PairedResult;
use super::paired::{Interval, METRIC_NAMES};
use super::{fmt_stat, split_title, Entry, SampleSet, Table};
use crate::eval::protocol::Split;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// A plot to embed.
pub struct Plot {
    pub title: String,
    /// The PNG file written beside the page.
    pub file: String,
    pub png: Vec<u8>,
}

/// Standard base64 (RFC 4648, with padding).
pub fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        s.push(A[(n >> 18) as usize & 63] as char);
        s.push(A[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 {
            A[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        s.push(if c.len() > 2 {
            A[n as usize & 63] as char
        } else {
            '='
        });
    }
    s
}

/// Escape text for HTML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn data_uri(png: &[u8]) -> String {
    format!("data:image/png;base64,{}", base64(png))
}

/// A JPEG thumbnail (longest edge `edge`, quality 85: a few kB, so a page with hundreds of
/// samples stays small) of an image file, as a data URI.
fn thumbnail(path: &Path, edge: u32) -> Result<String> {
    let img = image::open(path)
        .with_context(|| format!("cannot read the sample image {}", path.display()))?;
    let t = img.thumbnail(edge, edge).to_rgb8();
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 85)
        .encode_image(&t)
        .context("cannot encode a thumbnail")?;
    Ok(format!("data:image/jpeg;base64,{}", base64(&jpeg)))
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 10px;text-align:right}\
th{background:#f2f2f2}td.l,th.l{text-align:left}td.best{font-weight:bold}\
figure{margin:1em 0}figure img{max-width:min(100%,760px);border:1px solid #ddd}\
.grid td{vertical-align:top;text-align:left}.grid img{margin:2px;border:1px solid #ddd}\
.muted{color:#777;font-size:90%}code{background:#f5f5f5;padding:1px 4px}\
td.up{font-weight:bold;color:#1a7f37}td.down{font-weight:bold;color:#b42318}";

fn table_html(t: &Table) -> String {
    let mut s = format!(
        "<h3>{}</h3>\n<table>\n<tr><th class=l>method</th><th class=l>schedule</th>\
         <th>subjects</th><th>images</th><th>CLIP-T</th><th>CLIP-I</th><th>DINO</th></tr>\n",
        escape(t.title())
    );
    // The best mean of each metric is bold.
    let best = |f: fn(&super::Row) -> f64| {
        t.rows
            .iter()
            .map(f)
            .filter(|v| v.is_finite())
            .fold(f64::NEG_INFINITY, f64::max)
    };
    let bt = best(|r| r.metrics.clip_t.mean);
    let bi = best(|r| r.metrics.clip_i.mean);
    let bd = best(|r| r.metrics.dino.mean);
    for r in &t.rows {
        let m = &r.metrics;
        let cell = |st: &crate::eval::summary::Stat, b: f64| {
            let class = if t.rows.len() > 1 && st.mean == b {
                " class=best"
            } else {
                ""
            };
            format!("<td{class}>{}</td>", escape(&fmt_stat(st)))
        };
        let _ = writeln!(
            s,
            "<tr><td class=l>{}</td><td class=l>{}</td><td title=\"{}\">{}</td><td>{}</td>{}{}{}</tr>",
            escape(&r.method),
            escape(&r.schedule),
            escape(&r.subjects.join(", ")),
            r.subjects.len(),
            m.n,
            cell(&m.clip_t, bt),
            cell(&m.clip_i, bi),
            cell(&m.dino, bd)
        );
    }
    s.push_str("</table>\n");
    s
}

/// Classic minus split-test for the rows that have both.
fn overestimate_html(tables: &[Table]) -> String {
    let test = tables.iter().find(|t| t.split == Split::Test);
    let train = tables.iter().find(|t| t.split == Split::Train);
    let (Some(test), Some(train)) = (test, train) else {
        return String::new();
    };
    let mut s = String::from(
        "<h3>How much the classic protocol overestimates (classic minus split-test)</h3>\n<table>\n\
         <tr><th class=l>method</th><th class=l>schedule</th><th>CLIP-T</th><th>CLIP-I</th><th>DINO</th></tr>\n",
    );
    let mut any = false;
    for c in &train.rows {
        let Some(t) = test
            .rows
            .iter()
            .find(|t| t.method == c.method && t.schedule == c.schedule)
        else {
            continue;
        };
        any = true;
        let d = |a: f64, b: f64| format!("{:+.4}", a - b);
        let _ = writeln!(
            s,
            "<tr><td class=l>{}</td><td class=l>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&c.method),
            escape(&c.schedule),
            d(c.metrics.clip_t.mean, t.metrics.clip_t.mean),
            d(c.metrics.clip_i.mean, t.metrics.clip_i.mean),
            d(c.metrics.dino.mean, t.metrics.dino.mean)
        );
    }
    s.push_str("</table>\n");
    if any {
        s
    } else {
        String::new()
    }
}

fn grid_html(samples: &[SampleSet], thumb: u32) -> Result<String> {
    let mut subjects: Vec<String> = samples.iter().map(|s| s.subject.clone()).collect();
    subjects.sort();
    subjects.dedup();
    // Rows in the entries' order (method, schedule).
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut cells: BTreeMap<(String, String, String), &SampleSet> = BTreeMap::new();
    for s in samples {
        let key = (s.method.clone(), s.schedule.clone());
        if !rows.contains(&key) {
            rows.push(key);
        }
        cells.insert((s.method.clone(), s.schedule.clone(), s.subject.clone()), s);
    }
    let mut h =
        String::from("<table class=grid>\n<tr><th class=l>method</th><th class=l>schedule</th>");
    for subj in &subjects {
        let _ = write!(h, "<th class=l>{}</th>", escape(subj));
    }
    h.push_str("</tr>\n");
    // The held-out test images the split-test samples are scored against.
    let mut refs: BTreeMap<&str, Vec<&std::path::PathBuf>> = BTreeMap::new();
    for s in samples {
        let v = refs.entry(s.subject.as_str()).or_default();
        for r in &s.references {
            if !v.contains(&r) {
                v.push(r);
            }
        }
    }
    if refs.values().any(|v| !v.is_empty()) {
        h.push_str("<tr><td class=l colspan=2>held-out test images<br><span class=muted>(split-test references)</span></td>");
        for subj in &subjects {
            h.push_str("<td>");
            for p in refs.get(subj.as_str()).into_iter().flatten() {
                let uri = thumbnail(p, thumb)?;
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default();
                let _ = write!(
                    h,
                    "<img src=\"{}\" title=\"{}\" alt=\"{}\">",
                    uri,
                    escape(&name),
                    escape(&name)
                );
            }
            h.push_str("</td>");
        }
        h.push_str("</tr>\n");
    }
    for (m, sch) in &rows {
        let _ = write!(
            h,
            "<tr><td class=l>{}</td><td class=l>{}</td>",
            escape(m),
            escape(sch)
        );
        for subj in &subjects {
            h.push_str("<td>");
            if let Some(set) = cells.get(&(m.clone(), sch.clone(), subj.clone())) {
                for (path, prompt) in &set.images {
                    let uri = thumbnail(path, thumb)?;
                    let _ = write!(
                        h,
                        "<img src=\"{}\" title=\"{}\" alt=\"{}\">",
                        uri,
                        escape(prompt),
                        escape(prompt)
                    );
                }
                if set.images.is_empty() {
                    h.push_str("<span class=muted>no images kept</span>");
                }
            }
            h.push_str("</td>");
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");
    Ok(h)
}

/// `+0.0123 [+0.0050, +0.0190]` and its cell class: `up` / `down` when the interval lies above
/// / below 0 (marked ▲ / ▼), none otherwise.
fn interval_cell(iv: &Interval) -> String {
    let (class, mark) = if iv.lo > 0.0 {
        (" class=up", " ▲")
    } else if iv.hi < 0.0 {
        (" class=down", " ▼")
    } else {
        ("", "")
    };
    format!(
        "<td{class}>{:+.4} [{:+.4}, {:+.4}]{mark}</td>",
        iv.mean, iv.lo, iv.hi
    )
}

/// The paired table (one row per comparison and protocol), the notes on left-out lines, and
/// the per-subject table.
fn paired_html(paired: &[PairedResult], resamples: usize, seed: u64) -> String {
    if paired.is_empty() {
        return String::new();
    }
    let mut h = String::from("<h2>Paired comparisons (B − A)</h2>\n");
    let _ = writeln!(
        h,
        "<p class=muted>Each row compares two methods on the images both generated from the same \
         (subject, test image or prompt, caption, sample) and so the same seed: Δ = B − A per \
         image, positive when B scores higher. The mean Δ is over all pairs; the 95 % interval \
         is a percentile bootstrap ({resamples} resamples, seed {seed}) resampling subjects, then \
         images within each subject. Intervals that exclude 0 are marked ▲ (B higher) or ▼ \
         (B lower). A + variant is compared with its base's single run of the same subject, \
         once per schedule. <i>unmatched</i>: results lines of either side without a \
         partner (left out).</p>"
    );
    h.push_str(
        "<table>\n<tr><th class=l>B − A</th><th class=l>protocol</th><th>subjects</th>\
         <th>pairs</th><th>unmatched</th>",
    );
    for m in METRIC_NAMES {
        let _ = write!(h, "<th>Δ {m} (B − A) [95 % CI]</th>");
    }
    h.push_str("</tr>\n");
    let mut notes = Vec::new();
    for r in paired {
        let _ = write!(
            h,
            "<tr><td class=l>{}</td><td class=l>{}</td><td>{}</td><td>{}</td><td>{}</td>",
            escape(&r.comparison.label()),
            escape(split_title(r.split)),
            r.subjects,
            r.pairs,
            r.unmatched
        );
        match &r.intervals {
            Some(iv) => iv.iter().for_each(|i| h.push_str(&interval_cell(i))),
            None => h.push_str("<td colspan=3 class=muted>no pairs</td>"),
        }
        h.push_str("</tr>\n");
        let what = format!("{}, {}", r.comparison.label(), split_title(r.split));
        if !r.unpaired_subjects.is_empty() {
            notes.push(format!(
                "{what}: only one side has subject(s) {}",
                r.unpaired_subjects.join(", ")
            ));
        }
        for (s, why) in &r.incompatible {
            notes.push(format!(
                "{what}: subject {s} left out, scored differently ({why})"
            ));
        }
    }
    h.push_str("</table>\n");
    if !notes.is_empty() {
        h.push_str("<ul class=muted>\n");
        for n in notes {
            let _ = writeln!(h, "<li>{}</li>", escape(&n));
        }
        h.push_str("</ul>\n");
    }
    h.push_str(
        "<h3>Per subject (mean Δ = B − A)</h3>\n<table>\n<tr><th class=l>B − A</th>\
         <th class=l>protocol</th><th class=l>subject</th><th>pairs</th>",
    );
    for m in METRIC_NAMES {
        let _ = write!(h, "<th>Δ {m}</th>");
    }
    h.push_str("</tr>\n");
    for r in paired {
        for d in &r.per_subject {
            let _ = write!(
                h,
                "<tr><td class=l>{}</td><td class=l>{}</td><td class=l>{}</td><td>{}</td>",
                escape(&r.comparison.label()),
                escape(split_title(r.split)),
                escape(&d.subject),
                d.pairs
            );
            for v in d.mean {
                let _ = write!(h, "<td>{v:+.4}</td>");
            }
            h.push_str("</tr>\n");
        }
    }
    h.push_str("</table>\n");
    h
}

fn figure(p: &Plot) -> String {
    format!(
        "<figure><img src=\"{}\" alt=\"{}\"><figcaption>{} (<code>{}</code>)</figcaption></figure>\n",
        data_uri(&p.png),
        escape(&p.title),
        escape(&p.title),
        escape(&p.file)
    )
}

/// Everything the page shows.
pub struct PageParts<'a> {
    pub sweep: &'a Path,
    pub entries: &'a [Entry],
    pub tables: &'a [Table],
    pub plots: &'a [Plot],
    pub samples: &'a [SampleSet],
    pub thumb: u32,
    pub paired: &'a [PairedResult],
    /// The bootstrap behind the paired intervals (stated on the page).
    pub resamples: usize,
    pub seed: u64,
    pub qualitative: Option<&'a Plot>,
    pub losses: Option<&'a Plot>,
}

/// The whole page.
pub fn page(parts: &PageParts) -> Result<String> {
    let PageParts {
        sweep,
        entries,
        tables,
        plots,
        samples,
        thumb,
        ..
    } = *parts;
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n\
         <title>attractor sweep report: {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>Sweep report</h1>\n<p>Sweep folder <code>{}</code>: {} evaluated run(s).</p>\n",
        escape(&sweep.display().to_string()),
        escape(&sweep.display().to_string()),
        entries.len()
    );
    h.push_str(
        "<p class=muted>Each row pools the generated images of all its subjects: the mean and \
         the standard error (sd / &radic;n) of CLIP-T (prompt fidelity), CLIP-I and DINO (subject \
         fidelity). The split-test protocol scores each caption against its own held-out test \
         image; the classic protocol scores DreamBooth prompts against the training images. \
         The best mean of each column is bold.</p>\n",
    );
    h.push_str("<h2>Tables</h2>\n");
    for t in tables {
        h.push_str(&table_html(t));
    }
    h.push_str(&overestimate_html(tables));
    h.push_str(&paired_html(parts.paired, parts.resamples, parts.seed));
    h.push_str("<h2>Plots</h2>\n");
    for p in plots {
        h.push_str(&figure(p));
    }
    if let Some(q) = parts.qualitative {
        h.push_str(
            "<h2>Qualitative comparison</h2>\n<p class=muted>One held-out test image per row: \
             the reference, its caption (the placeholder shown as S*), then each method's image \
             generated from that caption with the same seed. Empty cells: the method has no such \
             image.</p>\n",
        );
        h.push_str(&figure(q));
    }
    if let Some(l) = parts.losses {
        h.push_str(
            "<h2>Training losses</h2>\n<p class=muted>The noise-prediction loss on each \
             subject's held-out test images (solid) and on its training images (dashed), at \
             fixed (t, noise) pairs, as the runs logged them in <code>metrics.jsonl</code>. A \
             held-out loss that rises while the training-reference loss falls is overfitting.\
             </p>\n",
        );
        h.push_str(&figure(l));
    }
    h.push_str(
        "<h2>Samples</h2>\n<p class=muted>Generated images of each run (split-test first); \
                hover for the prompt.</p>\n",
    );
    h.push_str(&grid_html(samples, thumb)?);
    h.push_str("<h2>Runs</h2>\n<table>\n<tr><th class=l>subject</th><th class=l>method</th><th class=l>schedule</th><th class=l>evaluation folder</th></tr>\n");
    for e in entries {
        let _ = writeln!(
            h,
            "<tr><td class=l>{}</td><td class=l>{}</td><td class=l>{}</td><td class=l><code>{}</code></td></tr>",
            escape(&e.subject),
            escape(&e.method),
            escape(&e.schedule),
            escape(&e.eval_dir.display().to_string())
        );
    }
    h.push_str("</table>\n</body>\n</html>\n");
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("a <b> & \"c\" 'd'"),
            "a &lt;b&gt; &amp; &quot;c&quot; &#39;d&#39;"
        );
    }
}
