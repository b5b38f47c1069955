//! The report's plots, drawn with `plotters` into an RGB buffer and encoded as PNG:
//!
//! - [`schedule_bars`]: one panel per metric (CLIP-T, CLIP-I, DINO), a bar per contrastive-weight
//!   schedule with its standard error (the paper's Fig. 7);
//! - [`method_bubbles`]: every (method, schedule) as a bubble at (DINO, CLIP-I) whose area grows
//!   with CLIP-T (the paper's Fig. 5).
//!
//! Text uses DejaVu Sans, bundled in `assets/fonts/` (see its licence there), through plotters'
//! `ab_glyph` backend, so the plots look the same on every machine without system fonts.
//! Value axes are zoomed to the data (differences between schedules are small); the tables
//! carry the exact numbers.

use super::{Row, Table, NO_SCHEDULE};
use crate::eval::checkpoints::{StepScores, PROTOCOLS};
use crate::eval::summary::{Metrics, Stat};
use anyhow::{anyhow, Context, Result};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;
use std::sync::OnceLock;

static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
/// The family name the plots ask for.
const FONT: &str = "sans-serif";

/// Register the bundled font with plotters (once per process).
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!(
            "the bundled font assets/fonts/DejaVuSans.ttf could not be read by plotters"
        ))
    }
}

/// Distinct colours (Tableau 10).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    COLORS[i % COLORS.len()]
}

/// Draw into a `w x h` canvas and return it as PNG bytes.
fn render<F>(w: u32, h: u32, draw: F) -> Result<Vec<u8>>
where
    F: FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>,
{
    ensure_font()?;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
        draw(&root)?;
        root.present().map_err(|e| anyhow!("plot: {e}"))?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).context("plot buffer has the wrong size")?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .context("cannot encode the plot as PNG")?;
    Ok(png)
}

/// The rows of `table` per method that has schedules (attractor methods), in table order.
pub fn schedule_groups(table: &Table) -> Vec<(String, Vec<Row>)> {
    let mut out: Vec<(String, Vec<Row>)> = Vec::new();
    for r in table.rows.iter().filter(|r| r.schedule != NO_SCHEDULE) {
        match out.iter_mut().find(|(m, _)| *m == r.method) {
            Some((_, rows)) => rows.push(r.clone()),
            None => out.push((r.method.clone(), vec![r.clone()])),
        }
    }
    out
}

/// A value range covering every `mean ± se`, padded; never empty.
fn value_range(stats: &[Stat]) -> (f64, f64) {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for s in stats.iter().filter(|s| s.mean.is_finite()) {
        let e = s.se.unwrap_or(0.0);
        lo = lo.min(s.mean - e);
        hi = hi.max(s.mean + e);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.15).max(0.005);
    (lo - pad, hi + pad)
}

/// A metric's name and how to read it from a row.
type MetricOf = (&'static str, fn(&Metrics) -> Stat);

const METRICS: [MetricOf; 3] = [
    ("CLIP-T", |m| m.clip_t),
    ("CLIP-I", |m| m.clip_i),
    ("DINO", |m| m.dino),
];

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("plot: {e}")
}

/// The schedule bar chart of one method (PNG): a panel per metric, a bar per schedule, error
/// bars of one standard error.
pub fn schedule_bars(table: &Table, method: &str, rows: &[Row]) -> Result<Vec<u8>> {
    let n = rows.len() as i32;
    let names: Vec<String> = rows.iter().map(|r| r.schedule.clone()).collect();
    let subjects = rows.iter().map(|r| r.subjects.len()).max().unwrap_or(0);
    render(960, 1020, |root| {
        let title = format!(
            "{method}: contrastive-weight schedules ({}, {subjects} subject{})",
            table.title(),
            if subjects == 1 { "" } else { "s" }
        );
        let area = root.titled(&title, (FONT, 24)).map_err(err)?;
        for (panel, (label, get)) in area.split_evenly((3, 1)).iter().zip(METRICS) {
            let stats: Vec<Stat> = rows.iter().map(|r| get(&r.metrics)).collect();
            let (lo, hi) = value_range(&stats);
            let mut chart = ChartBuilder::on(panel)
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(70)
                .build_cartesian_2d((0..(n - 1).max(0)).into_segmented(), lo..hi)
                .map_err(err)?;
            let fmt = |v: &SegmentValue<i32>| match v {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                    names.get(*i as usize).cloned().unwrap_or_default()
                }
                SegmentValue::Last => String::new(),
            };
            chart
                .configure_mesh()
                .max_light_lines(1)
                .disable_x_mesh()
                .x_labels(rows.len().max(1))
                .x_label_formatter(&fmt)
                .y_labels(6)
                .y_label_formatter(&|y| format!("{y:.3}"))
                .y_desc(label)
                .label_style((FONT, 16))
                .axis_desc_style((FONT, 18))
                .draw()
                .map_err(err)?;
            chart
                .draw_series(stats.iter().enumerate().map(|(i, s)| {
                    let i = i as i32;
                    let mut bar = Rectangle::new(
                        [
                            (SegmentValue::Exact(i), lo),
                            (SegmentValue::Exact(i + 1), s.mean.max(lo)),
                        ],
                        color(i as usize).filled(),
                    );
                    bar.set_margin(0, 0, 14, 14);
                    bar
                }))
                .map_err(err)?;
            chart
                .draw_series(stats.iter().enumerate().filter_map(|(i, s)| {
                    s.se.map(|e| {
                        PathElement::new(
                            vec![
                                (SegmentValue::CenterOf(i as i32), s.mean - e),
                                (SegmentValue::CenterOf(i as i32), s.mean + e),
                            ],
                            BLACK.stroke_width(2),
                        )
                    })
                }))
                .map_err(err)?;
            chart
                .draw_series(stats.iter().enumerate().map(|(i, s)| {
                    Text::new(
                        format!("{:.4}", s.mean),
                        (SegmentValue::CenterOf(i as i32), hi - (hi - lo) * 0.02),
                        (FONT, 15)
                            .into_font()
                            .color(&BLACK)
                            .pos(Pos::new(HPos::Center, VPos::Top)),
                    )
                }))
                .map_err(err)?;
        }
        Ok(())
    })
}

/// The method bubble chart (PNG): x DINO, y CLIP-I, bubble area growing with CLIP-T, one
/// colour per method, each bubble labelled `method schedule`.
pub fn method_bubbles(table: &Table) -> Result<Vec<u8>> {
    let rows = &table.rows;
    let dino: Vec<Stat> = rows.iter().map(|r| r.metrics.dino).collect();
    let clip_i: Vec<Stat> = rows.iter().map(|r| r.metrics.clip_i).collect();
    let (x0, x1) = value_range(&dino);
    let (y0, y1) = value_range(&clip_i);
    let ct: Vec<f64> = rows.iter().map(|r| r.metrics.clip_t.mean).collect();
    let ct_lo = ct
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f64::INFINITY, f64::min);
    let ct_hi = ct
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    // Radius so that area is linear in CLIP-T between the smallest and largest bubble.
    let radius = |v: f64| -> i32 {
        let (rmin, rmax) = (8.0f64, 40.0f64);
        let t = if ct_hi > ct_lo && v.is_finite() {
            (v - ct_lo) / (ct_hi - ct_lo)
        } else {
            0.5
        };
        (rmin * rmin + t * (rmax * rmax - rmin * rmin))
            .sqrt()
            .round() as i32
    };
    let mut methods: Vec<String> = Vec::new();
    for r in rows {
        if !methods.contains(&r.method) {
            methods.push(r.method.clone());
        }
    }
    render(960, 800, |root| {
        let title = format!(
            "Methods ({}): x DINO, y CLIP-I, bubble area CLIP-T",
            table.title()
        );
        let area = root.titled(&title, (FONT, 24)).map_err(err)?;
        let (plot_area, legend) = area.split_vertically(690);
        let mut chart = ChartBuilder::on(&plot_area)
            .margin(20)
            .x_label_area_size(46)
            .y_label_area_size(76)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .max_light_lines(1)
            .x_desc("DINO")
            .y_desc("CLIP-I")
            .x_label_formatter(&|x| format!("{x:.3}"))
            .y_label_formatter(&|y| format!("{y:.3}"))
            .label_style((FONT, 16))
            .axis_desc_style((FONT, 18))
            .draw()
            .map_err(err)?;
        for (k, r) in rows.iter().enumerate() {
            let (x, y) = (r.metrics.dino.mean, r.metrics.clip_i.mean);
            if !(x.is_finite() && y.is_finite()) {
                continue;
            }
            let ci = methods.iter().position(|m| *m == r.method).unwrap_or(0);
            let c = color(ci);
            let rad = radius(ct[k]);
            let label = if r.schedule == NO_SCHEDULE {
                r.method.clone()
            } else {
                format!("{} {}", r.method, r.schedule)
            };
            let bubble = EmptyElement::at((x, y))
                + Circle::new((0, 0), rad, c.mix(0.45).filled())
                + Circle::new((0, 0), rad, c.stroke_width(2))
                + Text::new(
                    label,
                    (rad + 4, 0),
                    (FONT, 15)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Left, VPos::Center)),
                );
            chart.draw_series(std::iter::once(bubble)).map_err(err)?;
        }
        let note = if ct_hi >= ct_lo {
            format!(
                "bubble area: CLIP-T from {ct_lo:.4} (smallest) to {ct_hi:.4} (largest); colours: {}",
                methods.join(", ")
            )
        } else {
            "no CLIP-T values".to_string()
        };
        legend
            .draw(&Text::new(
                note,
                (20, 10),
                (FONT, 16).into_font().color(&BLACK),
            ))
            .map_err(err)?;
        let mut x = 20;
        for (i, m) in methods.iter().enumerate() {
            legend
                .draw(&Circle::new((x + 8, 48), 8, color(i).filled()))
                .map_err(err)?;
            legend
                .draw(&Text::new(
                    m.clone(),
                    (x + 22, 48),
                    (FONT, 16)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Left, VPos::Center)),
                ))
                .map_err(err)?;
            x += 40 + 10 * m.len() as i32;
        }
        Ok(())
    })
}

/// Scores over training steps (PNG, the paper's Fig. 1): a panel per metric, a line per
/// protocol (split-test, classic) with error bars of one standard error.
pub fn training_curves(title: &str, steps: &[StepScores]) -> Result<Vec<u8>> {
    let mut steps: Vec<&StepScores> = steps.iter().collect();
    steps.sort_by_key(|s| s.step);
    let x_lo = steps.first().map(|s| s.step as f64).unwrap_or(0.0);
    let x_hi = steps.last().map(|s| s.step as f64).unwrap_or(1.0);
    let pad = ((x_hi - x_lo) * 0.05).max(0.5);
    let (x0, x1) = (x_lo - pad, x_hi + pad);
    render(960, 1020, |root| {
        let area = root.titled(title, (FONT, 24)).map_err(err)?;
        for (panel, (label, get)) in area.split_evenly((3, 1)).iter().zip(METRICS) {
            let all: Vec<Stat> = steps
                .iter()
                .flat_map(|s| PROTOCOLS.iter().filter_map(|(sp, _)| s.get(*sp).map(get)))
                .collect();
            let (lo, hi) = value_range(&all);
            let mut chart = ChartBuilder::on(panel)
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(x0..x1, lo..hi)
                .map_err(err)?;
            chart
                .configure_mesh()
                .max_light_lines(1)
                .x_desc("training step")
                .y_desc(label)
                // Steps are whole numbers: no labels between them on short runs.
                .x_label_formatter(&|x| {
                    if (x - x.round()).abs() < 1e-9 {
                        format!("{x:.0}")
                    } else {
                        String::new()
                    }
                })
                .y_label_formatter(&|y| format!("{y:.3}"))
                .label_style((FONT, 16))
                .axis_desc_style((FONT, 18))
                .draw()
                .map_err(err)?;
            for (i, (split, name)) in PROTOCOLS.iter().enumerate() {
                let pts: Vec<(f64, Stat)> = steps
                    .iter()
                    .filter_map(|s| s.get(*split).map(|m| (s.step as f64, get(m))))
                    .filter(|(_, st)| st.mean.is_finite())
                    .collect();
                if pts.is_empty() {
                    continue;
                }
                let c = color(i);
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        pts.iter().map(|(x, st)| (*x, st.mean)).collect::<Vec<_>>(),
                        c.stroke_width(3),
                    )))
                    .map_err(err)?
                    .label(*name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3))
                    });
                chart
                    .draw_series(
                        pts.iter()
                            .map(|(x, st)| Circle::new((*x, st.mean), 4, c.filled())),
                    )
                    .map_err(err)?;
                chart
                    .draw_series(pts.iter().filter_map(|(x, st)| {
                        st.se.map(|e| {
                            PathElement::new(
                                vec![(*x, st.mean - e), (*x, st.mean + e)],
                                c.stroke_width(2),
                            )
                        })
                    }))
                    .map_err(err)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font((FONT, 16))
                .draw()
                .map_err(err)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::protocol::Split;
    use crate::eval::summary::Metrics;

    fn row(method: &str, schedule: &str, v: f64) -> Row {
        let s = |m: f64| Stat {
            mean: m,
            se: Some(0.01),
        };
        Row {
            method: method.into(),
            schedule: schedule.into(),
            subjects: vec!["dog".into(), "cat".into()],
            metrics: Metrics {
                n: 10,
                clip_t: s(0.2 + v),
                clip_i: s(0.7 + v),
                dino: s(0.5 - v),
            },
        }
    }

    fn curve_steps() -> Vec<StepScores> {
        (1..=4)
            .map(|k| {
                let v = k as f64 * 0.01;
                StepScores {
                    step: 100 * k,
                    test: Some(row("neti", NO_SCHEDULE, v).metrics),
                    classic: Some(row("neti", NO_SCHEDULE, -v).metrics),
                }
            })
            .collect()
    }

    /// Both protocols' lines of the curve plot are drawn, in their two colours.
    #[test]
    fn training_curves_draw_both_protocols() {
        let png = training_curves("curves", &curve_steps()).unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        for c in [color(0), color(1)] {
            let n = img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count();
            assert!(n > 500, "{n} pixels of {c:?}");
        }
        // One protocol only (a `--split test` evaluation) still renders.
        let mut one = curve_steps();
        one.iter_mut().for_each(|s| s.classic = None);
        let img = image::load_from_memory(&training_curves("t", &one).unwrap())
            .unwrap()
            .to_rgb8();
        let c = color(1);
        // Only the legend would have it; no classic line is drawn, so no legend entry either.
        assert_eq!(img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count(), 0);
    }

    /// The plots render to PNGs of the expected size with text and colour on them.
    #[test]
    fn plots_render_with_text() {
        let table = Table {
            split: Split::Test,
            rows: vec![
                row("neti", NO_SCHEDULE, 0.0),
                row("neti+", "zero", 0.01),
                row("neti+", "cosine", 0.03),
            ],
        };
        let groups = schedule_groups(&table);
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].1.len(), 2);
        for (png, (w, h)) in [
            (
                schedule_bars(&table, "neti+", &groups[0].1).unwrap(),
                (960, 1020),
            ),
            (method_bubbles(&table).unwrap(), (960, 800)),
            (
                training_curves("dog: neti+ on dog, scores over training", &curve_steps()).unwrap(),
                (960, 1020),
            ),
        ] {
            let img = image::load_from_memory(&png).unwrap().to_rgb8();
            assert_eq!(img.dimensions(), (w, h));
            let dark = img.pixels().filter(|p| p.0.iter().all(|c| *c < 60)).count();
            let coloured = img
                .pixels()
                .filter(|p| p.0.iter().max().unwrap() - p.0.iter().min().unwrap() > 80)
                .count();
            // The title was drawn with the bundled font: dark pixels in the top band.
            let title = (0..w)
                .flat_map(|x| (0..30).map(move |y| (x, y)))
                .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|c| *c < 60))
                .count();
            assert!(title > 200, "{title} dark pixels in the title band");
            // Text and axes (dark) and bars / bubbles (coloured) were drawn.
            assert!(dark > 2000, "{dark} dark pixels");
            assert!(coloured > 2000, "{coloured} coloured pixels");
        }
    }
}
