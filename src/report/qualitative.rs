//! The qualitative grid (`qualitative.png`, the paper's Fig. 6; issue 21, item 4): one row per
//! chosen held-out test image, its cells the reference test image, the caption (rendered text,
//! `{}` shown as `S*`), then each (method, schedule) of the sweep's split-test table's image for
//! the same (subject, test image, caption, sample), i.e. generated from the same seed. A header
//! row names the columns; a method that lacks the image gets an empty labelled cell.
//!
//! Which rows (deterministic, from the results lines alone): for each subject (by name), each
//! of its test images proposes the (caption, sample) that the most columns have a results line
//! for, ties to the lowest (caption index, sample); a subject's test images are ordered by that
//! count (most first), then by file name. Rows are then taken round-robin over the subjects
//! (every subject's first test image, then every subject's second, ...) until `N` rows
//! (`--grid N`, default one per subject, at most 8).
//!
//! [`compose`] draws the grid from images in memory (no I/O); [`load`] finds the files: the
//! generated images under each evaluation folder (`images/<subject>/<test stem>/<caption>/
//! <sample>.png`, as its results line says) and the reference under the dataset folder the
//! evaluation recorded (`<data>/<subject>/test/<file>`) or the one given with `--data`.

use super::plot::{ensure_font, FONT};
use super::{Entry, NO_SCHEDULE};
use crate::eval::protocol::Split;
use crate::eval::store::Record;
use anyhow::{anyhow, Context, Result};
use image::{imageops, RgbImage};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The default number of rows: one per subject, at most this many.
pub const DEFAULT_MAX_ROWS: usize = 8;

/// One chosen row: which generated image of which subject.
#[derive(Clone, Debug, PartialEq)]
pub struct RowChoice {
    pub subject: String,
    pub test_image: String,
    pub caption_index: usize,
    pub sample: usize,
    /// The caption with its `{}`.
    pub caption: String,
    /// The results key shared by every method's line for this image.
    pub key: String,
}

/// A column of the grid: one (method, schedule).
pub type Column = (String, String);

/// The columns: every (method, schedule) with split-test results, in the entries' (tables')
/// order.
pub fn columns(entries: &[Entry]) -> Vec<Column> {
    let mut out: Vec<Column> = Vec::new();
    for e in entries.iter().filter(|e| e.summary.test.is_some()) {
        let c = (e.method.clone(), e.schedule.clone());
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// Choose the rows (see the module doc): `rows` of them, or one per subject up to
/// [`DEFAULT_MAX_ROWS`] when `None`. `lines(subject, column)` gives that run's split-test lines.
pub fn choose_rows<'a>(
    subjects: &[String],
    columns: &[Column],
    lines: impl Fn(&str, &Column) -> Vec<&'a Record>,
    rows: Option<usize>,
) -> Vec<RowChoice> {
    let want = rows.unwrap_or(subjects.len().min(DEFAULT_MAX_ROWS));
    // Per subject: its test images, best first, each with its chosen image.
    let mut per_subject: Vec<Vec<RowChoice>> = Vec::new();
    for subject in subjects {
        // (test image, caption, sample) -> (columns having it, a line of it).
        let mut count: BTreeMap<(String, usize, usize), (usize, &Record)> = BTreeMap::new();
        for c in columns {
            let mut seen: Vec<&str> = Vec::new();
            for r in lines(subject, c) {
                let Some(t) = &r.test_image else { continue };
                if r.split != Split::Test || seen.contains(&r.key.as_str()) {
                    continue;
                }
                seen.push(&r.key);
                count
                    .entry((t.clone(), r.caption_index, r.sample))
                    .or_insert((0, r))
                    .0 += 1;
            }
        }
        // Best (caption, sample) per test image: most columns, then the lowest indices (the
        // map iterates in (caption, sample) order, and only a strictly larger count replaces).
        let mut best: BTreeMap<&str, (usize, &Record)> = BTreeMap::new();
        for ((t, _, _), (n, r)) in &count {
            match best.get(t.as_str()) {
                Some((m, _)) if *m >= *n => {}
                _ => {
                    best.insert(t.as_str(), (*n, r));
                }
            }
        }
        let mut chosen: Vec<(usize, &str, &Record)> =
            best.into_iter().map(|(t, (n, r))| (n, t, r)).collect();
        chosen.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        per_subject.push(
            chosen
                .into_iter()
                .map(|(_, t, r)| RowChoice {
                    subject: subject.clone(),
                    test_image: t.to_string(),
                    caption_index: r.caption_index,
                    sample: r.sample,
                    caption: r.prompt.clone(),
                    key: r.key.clone(),
                })
                .collect(),
        );
    }
    let mut out = Vec::new();
    let mut round = 0;
    while out.len() < want && per_subject.iter().any(|v| v.len() > round) {
        for v in &per_subject {
            if out.len() == want {
                break;
            }
            if let Some(r) = v.get(round) {
                out.push(r.clone());
            }
        }
        round += 1;
    }
    out
}

/// A cell's content: an image, or a label for an empty cell.
#[derive(Clone, Debug)]
pub enum Cell {
    Image(RgbImage),
    Empty(String),
}

/// One row's contents, ready to draw.
#[derive(Clone, Debug)]
pub struct GridRow {
    pub reference: Cell,
    /// A short line above the caption (subject, test image, sample).
    pub label: String,
    pub caption: String,
    /// One per column.
    pub cells: Vec<Cell>,
}

/// The grid's geometry: every cell square `cell` pixels, the caption column twice as wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub cell: u32,
    pub columns: usize,
    pub rows: usize,
}

/// Space between cells and around the grid, pixels.
pub const GAP: u32 = 6;

impl Layout {
    pub fn font_size(&self) -> u32 {
        (self.cell / 11).clamp(11, 20)
    }

    pub fn caption_width(&self) -> u32 {
        2 * self.cell
    }

    /// Two lines of header text (method, schedule).
    pub fn header_height(&self) -> u32 {
        2 * (self.font_size() * 13 / 10) + 2 * GAP
    }

    /// The whole image, `(width, height)`.
    pub fn size(&self) -> (u32, u32) {
        let w = GAP
            + (self.cell + GAP)
            + (self.caption_width() + GAP)
            + self.columns as u32 * (self.cell + GAP);
        let h = self.header_height() + self.rows as u32 * (self.cell + GAP) + GAP;
        (w, h)
    }

    /// Top-left corner of a row's reference cell.
    pub fn reference_origin(&self, row: usize) -> (u32, u32) {
        (GAP, self.row_top(row))
    }

    fn row_top(&self, row: usize) -> u32 {
        self.header_height() + row as u32 * (self.cell + GAP)
    }

    /// Top-left corner of the caption cell of a row.
    pub fn caption_origin(&self, row: usize) -> (u32, u32) {
        (GAP + self.cell + GAP, self.row_top(row))
    }

    /// Top-left corner of method column `col`'s cell in `row`.
    pub fn cell_origin(&self, row: usize, col: usize) -> (u32, u32) {
        let x0 = GAP + (self.cell + GAP) + (self.caption_width() + GAP);
        (x0 + col as u32 * (self.cell + GAP), self.row_top(row))
    }
}

/// The image scaled to fit a `cell` x `cell` square, aspect kept (bilinear; what the grid
/// draws).
pub fn fit(img: &RgbImage, cell: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    if w == cell && h == cell {
        return img.clone();
    }
    let scale = cell as f64 / w.max(h).max(1) as f64;
    let nw = ((w as f64 * scale).round() as u32).clamp(1, cell);
    let nh = ((h as f64 * scale).round() as u32).clamp(1, cell);
    imageops::resize(img, nw, nh, imageops::FilterType::Triangle)
}

/// A column header: the method, and its schedule on a second line (none for methods without
/// an attractor).
pub fn header(column: &Column) -> (String, String) {
    let s = if column.1 == NO_SCHEDULE {
        String::new()
    } else {
        column.1.clone()
    };
    (column.0.clone(), s)
}

/// The caption as shown: the placeholder `{}` as `S*`.
pub fn shown_caption(caption: &str) -> String {
    caption.replace("{}", "S*")
}

/// Greedy word wrap of `text` into lines that `fits` (a word longer than the
/// width gets a line of its own).
fn wrap(text: &str, fits: impl Fn(&str) -> bool) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        let trial = if cur.is_empty() {
            word.to_string()
        } else {
            format!("{cur} {word}")
        };
        if cur.is_empty() || fits(&trial) {
            cur = trial;
        } else {
            lines.push(std::mem::take(&mut cur));
            cur = word.to_string();
        }
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("qualitative grid: {e}")
}

/// Draw the grid: a header row (`test image`, `caption`, then each column's [`header`]) and
/// each row's reference, label and caption, and cells, every image [`fit`] into its square
/// (centred; the top-left when it fills the square). Text is drawn first and the images
/// copied in after, so every image cell holds exactly the fitted image.
pub fn compose(columns: &[Column], rows: &[GridRow], cell: u32) -> Result<RgbImage> {
    if cell < 16 {
        return Err(err(format!("cells of {cell} px are too small to draw")));
    }
    ensure_font()?;
    let layout = Layout {
        cell,
        columns: columns.len(),
        rows: rows.len(),
    };
    let (w, h) = layout.size();
    let mut buf = vec![255u8; (w as usize) * (h as usize) * 3];
    let fs = layout.font_size();
    let line = fs * 13 / 10;
    let empty_fill = RGBColor(238, 238, 238);
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let font: TextStyle = (FONT, fs).into_font().into();
        let bold = (FONT, fs).into_font().color(&BLACK);
        let muted = (FONT, fs).into_font().color(&RGBColor(110, 110, 110));
        let centred = |x: u32, y: u32, width: u32, text: &str, style: &TextStyle| {
            root.draw(&Text::new(
                text.to_string(),
                ((x + width / 2) as i32, y as i32),
                style.pos(Pos::new(HPos::Center, VPos::Top)),
            ))
            .map_err(err)
        };
        let head_y = GAP;
        centred(GAP, head_y, cell, "test image", &bold)?;
        let (cx, _) = layout.caption_origin(0);
        centred(cx, head_y, layout.caption_width(), "caption", &bold)?;
        for (i, c) in columns.iter().enumerate() {
            let (x, _) = layout.cell_origin(0, i);
            let (m, s) = header(c);
            centred(x, head_y, cell, &m, &bold)?;
            if !s.is_empty() {
                centred(x, head_y + line, cell, &s, &muted)?;
            }
        }
        let fits = |t: &str, width: u32| {
            root.estimate_text_size(t, &font)
                .map(|(tw, _)| tw + 8 <= width)
                .unwrap_or(true)
        };
        let empty = |x: u32, y: u32, label: &str| -> Result<()> {
            root.draw(&Rectangle::new(
                [
                    (x as i32, y as i32),
                    ((x + cell) as i32 - 1, (y + cell) as i32 - 1),
                ],
                empty_fill.filled(),
            ))
            .map_err(err)?;
            for (k, l) in wrap(label, |t| fits(t, cell)).iter().enumerate() {
                centred(x, y + cell / 2 - line + k as u32 * line, cell, l, &muted)?;
            }
            Ok(())
        };
        for (r, row) in rows.iter().enumerate() {
            if let Cell::Empty(label) = &row.reference {
                let (x, y) = layout.reference_origin(r);
                empty(x, y, label)?;
            }
            let (x, y) = layout.caption_origin(r);
            let cw = layout.caption_width();
            let mut ty = y + 4;
            for l in wrap(&row.label, |t| fits(t, cw)) {
                root.draw(&Text::new(l, (x as i32 + 4, ty as i32), muted.clone()))
                    .map_err(err)?;
                ty += line;
            }
            ty += line / 2;
            for l in wrap(&shown_caption(&row.caption), |t| fits(t, cw)) {
                if ty + line > y + cell {
                    break;
                }
                root.draw(&Text::new(l, (x as i32 + 4, ty as i32), bold.clone()))
                    .map_err(err)?;
                ty += line;
            }
            for (i, c) in row.cells.iter().enumerate().take(columns.len()) {
                if let Cell::Empty(label) = c {
                    let (x, y) = layout.cell_origin(r, i);
                    empty(x, y, label)?;
                }
            }
        }
        root.present().map_err(err)?;
    }
    let mut img = RgbImage::from_raw(w, h, buf).context("grid buffer has the wrong size")?;
    let mut put = |src: &RgbImage, (x, y): (u32, u32)| {
        let f = fit(src, cell);
        let dx = x + (cell - f.width()) / 2;
        let dy = y + (cell - f.height()) / 2;
        imageops::replace(&mut img, &f, dx as i64, dy as i64);
    };
    for (r, row) in rows.iter().enumerate() {
        if let Cell::Image(src) = &row.reference {
            put(src, layout.reference_origin(r));
        }
        for (i, c) in row.cells.iter().enumerate().take(columns.len()) {
            if let Cell::Image(src) = c {
                put(src, layout.cell_origin(r, i));
            }
        }
    }
    Ok(img)
}

/// Read one image, or an empty cell saying why not (absent file); an unreadable file is an
/// error naming it.
fn read_cell(path: Option<&Path>, missing: &str) -> Result<Cell> {
    match path {
        Some(p) if p.is_file() => Ok(Cell::Image(
            image::open(p)
                .with_context(|| format!("cannot read the image {}", p.display()))?
                .to_rgb8(),
        )),
        _ => Ok(Cell::Empty(missing.to_string())),
    }
}

/// The chosen rows read from disk: each reference under `data` (or the dataset folder the
/// subject's evaluation recorded) and each column's generated image, as its results line names
/// it below its evaluation folder.
pub fn load(
    entries: &[Entry],
    records: &super::compare::RecordsByDir,
    columns: &[Column],
    choices: &[RowChoice],
    data: Option<&Path>,
) -> Result<Vec<GridRow>> {
    let mut out = Vec::new();
    for ch in choices {
        let of_subject: Vec<&Entry> = entries
            .iter()
            .filter(|e| e.subject == ch.subject && e.summary.test.is_some())
            .collect();
        let data_dir: Option<PathBuf> = data.map(Path::to_path_buf).or_else(|| {
            of_subject
                .first()
                .map(|e| e.summary.config.data.clone().into())
        });
        let reference = data_dir.map(|d| d.join(&ch.subject).join("test").join(&ch.test_image));
        let reference = read_cell(reference.as_deref(), "reference not found")?;
        let mut cells = Vec::new();
        for c in columns {
            let path = of_subject
                .iter()
                .filter(|e| e.method == c.0 && e.schedule == c.1)
                .find_map(|e| {
                    records.get(&e.eval_dir).and_then(|rs| {
                        rs.iter()
                            .find(|r| r.key == ch.key)
                            .map(|r| e.eval_dir.join(&r.image))
                    })
                });
            cells.push(read_cell(path.as_deref(), "no image")?);
        }
        out.push(GridRow {
            reference,
            label: format!(
                "{} · {} · caption {} · sample {}",
                ch.subject, ch.test_image, ch.caption_index, ch.sample
            ),
            caption: ch.caption.clone(),
            cells,
        });
    }
    Ok(out)
}

/// Encode an image as PNG bytes.
pub fn png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .context("cannot encode the qualitative grid as PNG")?;
    Ok(out)
}

/// A test image of `w` x `h` with a distinct colour per pixel position.
#[cfg(test)]
fn pattern(w: u32, h: u32, k: u8) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 7 % 251) as u8, (y * 5 % 241) as u8, k.wrapping_mul(37)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(subject: &str, test: &str, caption: usize, sample: usize) -> Record {
        Record {
            key: format!("{subject}/test/{test}/{caption}/{sample}"),
            subject: subject.into(),
            split: Split::Test,
            test_image: Some(test.into()),
            caption_index: caption,
            sample,
            seed: 0,
            prompt: format!("caption {caption} of {{}}"),
            clip_t_text: String::new(),
            clip_t: 0.0,
            clip_i: 0.0,
            dino: 0.0,
            image: String::new(),
        }
    }

    /// Rows: per subject the test images with the best-covered (caption, sample), most covered
    /// first; round-robin over subjects; the count defaults to one per subject.
    #[test]
    fn chooses_rows_deterministically() {
        let cols: Vec<Column> = vec![("ti".into(), "-".into()), ("ti+".into(), "cosine".into())];
        let dog_ti = [rec("dog", "01.jpg", 0, 0), rec("dog", "02.jpg", 1, 0)];
        let dog_plus = [
            rec("dog", "02.jpg", 1, 0),
            rec("dog", "02.jpg", 0, 1),
            rec("dog", "01.jpg", 2, 0),
        ];
        let cat = [rec("cat", "05.jpg", 0, 0), rec("cat", "04.jpg", 0, 0)];
        let lines = |s: &str, c: &Column| -> Vec<&Record> {
            match (s, c.0.as_str()) {
                ("dog", "ti") => dog_ti.iter().collect(),
                ("dog", _) => dog_plus.iter().collect(),
                ("cat", "ti") => cat.iter().collect(),
                _ => Vec::new(),
            }
        };
        let subjects = vec!["cat".to_string(), "dog".to_string()];
        let rows = choose_rows(&subjects, &cols, lines, None);
        let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        // cat: both test images in one column, by name; dog: 02.jpg caption 1 is in both.
        assert_eq!(keys, ["cat/test/04.jpg/0/0", "dog/test/02.jpg/1/0"]);
        let rows = choose_rows(&subjects, &cols, lines, Some(10));
        let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "cat/test/04.jpg/0/0",
                "dog/test/02.jpg/1/0",
                "cat/test/05.jpg/0/0",
                "dog/test/01.jpg/0/0"
            ]
        );
        assert_eq!(rows[1].caption, "caption 1 of {}");
        assert!(choose_rows(&subjects, &cols, lines, Some(0)).is_empty());
    }

    /// The grid's pixel size follows the layout, and each image cell holds exactly the fitted
    /// source image (a square source at the cell size unchanged; a larger one resized).
    #[test]
    fn grid_size_and_cells() {
        let cell = 48;
        let cols: Vec<Column> = vec![
            ("ti".into(), NO_SCHEDULE.into()),
            ("ti+".into(), "cosine".into()),
            ("neti+".into(), "cosine".into()),
        ];
        let big = pattern(96, 96, 3);
        let rows = vec![
            GridRow {
                reference: Cell::Image(pattern(48, 48, 1)),
                label: "dog · 01.jpg".into(),
                caption: "a photo of {} on a very long beach with waves and sand".into(),
                cells: vec![
                    Cell::Image(pattern(48, 48, 2)),
                    Cell::Empty("no image".into()),
                    Cell::Image(big.clone()),
                ],
            },
            GridRow {
                reference: Cell::Empty("reference not found".into()),
                label: "cat · 02.jpg".into(),
                caption: "{} in the snow".into(),
                cells: vec![
                    Cell::Image(pattern(32, 64, 4)),
                    Cell::Image(pattern(48, 48, 5)),
                    Cell::Empty("no image".into()),
                ],
            },
        ];
        let img = compose(&cols, &rows, cell).unwrap();
        let layout = Layout {
            cell,
            columns: 3,
            rows: 2,
        };
        assert_eq!(img.dimensions(), layout.size());
        let (w, h) = layout.size();
        assert_eq!(w, GAP + (cell + GAP) + (2 * cell + GAP) + 3 * (cell + GAP));
        assert_eq!(h, layout.header_height() + 2 * (cell + GAP) + GAP);
        let crop = |(x, y): (u32, u32), cw: u32, ch: u32| {
            imageops::crop_imm(&img, x, y, cw, ch).to_image()
        };
        assert_eq!(
            crop(layout.reference_origin(0), cell, cell),
            pattern(48, 48, 1)
        );
        assert_eq!(
            crop(layout.cell_origin(0, 0), cell, cell),
            pattern(48, 48, 2)
        );
        let resized = imageops::resize(&big, cell, cell, imageops::FilterType::Triangle);
        assert_eq!(crop(layout.cell_origin(0, 2), cell, cell), resized);
        assert_eq!(
            crop(layout.cell_origin(1, 1), cell, cell),
            pattern(48, 48, 5)
        );
        // A tall source: 24 x 48, centred horizontally.
        let (x, y) = layout.cell_origin(1, 0);
        let tall = fit(&pattern(32, 64, 4), cell);
        assert_eq!(tall.dimensions(), (24, 48));
        assert_eq!(crop((x + 12, y), 24, 48), tall);
        // Empty cells are grey with a label (some dark text pixels), captions and headers
        // are drawn.
        let grey = crop(layout.cell_origin(0, 1), cell, cell);
        assert_eq!(*grey.get_pixel(1, 1), image::Rgb([238, 238, 238]));
        assert!(grey.pixels().any(|p| p.0[0] < 200));
        let caption = crop(layout.caption_origin(0), 2 * cell, cell);
        assert!(caption.pixels().filter(|p| p.0[0] < 128).count() > 20);
        let head = crop((0, 0), w, layout.header_height());
        assert!(head.pixels().filter(|p| p.0[0] < 128).count() > 20);
        assert!(compose(&cols, &rows, 8).is_err());
    }

    #[test]
    fn wraps_words_and_shows_the_placeholder() {
        let fits = |t: &str| t.len() <= 10;
        assert_eq!(
            wrap("a photo of S* on the beach", fits),
            ["a photo of", "S* on the", "beach"]
        );
        assert_eq!(
            wrap("extraordinarily long", fits),
            ["extraordinarily", "long"]
        );
        assert_eq!(shown_caption("a {} on a rock"), "a S* on a rock");
    }
}
