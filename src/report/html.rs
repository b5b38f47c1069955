//! The report's HTML page: one self-contained file (no external requests) with the tables,
//! the plots and a grid of generated samples, every image embedded as a base64 `data:` URI
//! (plots as PNG, sample thumbnails as JPEG).

use super::{fmt_stat, Entry, SampleSet, Table};
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
.muted{color:#777;font-size:90%}code{background:#f5f5f5;padding:1px 4px}";

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

/// The whole page.
pub fn page(
    sweep: &Path,
    entries: &[Entry],
    tables: &[Table],
    plots: &[Plot],
    samples: &[SampleSet],
    thumb: u32,
) -> Result<String> {
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
    h.push_str("<h2>Plots</h2>\n");
    for p in plots {
        let _ = writeln!(
            h,
            "<figure><img src=\"{}\" alt=\"{}\"><figcaption>{} (<code>{}</code>)</figcaption></figure>",
            data_uri(&p.png),
            escape(&p.title),
            escape(&p.title),
            escape(&p.file)
        );
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
