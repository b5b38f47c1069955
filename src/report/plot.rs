//! The report's plots, drawn with `plotters` into an RGB buffer and encoded as PNG:
//!
//! - [`schedule_bars`]: one panel per metric (CLIP-T, CLIP-I, DINO), a bar per contrastive-weight
//!   schedule with its standard error (the paper's Fig. 7);
//! - [`loss_curves`]: held-out and training-reference loss over training steps, a panel per
//!   subject (issue 23);
//! - [`method_bubbles`]: every (method, schedule) as a bubble at (DINO, CLIP-I) whose area grows
//!   with CLIP-T, coloured by method [`Family`], with an arrow from each base method to its +
//!   variant (the paper's Fig. 5; the geometry is [`bubble_layout`]'s).
//!
//! Text uses DejaVu Sans, bundled in `assets/fonts/` (see its licence there), through plotters'
//! `ab_glyph` backend, so the plots look the same on every machine without system fonts.
//! Value axes are zoomed to the data (differences between schedules are small); the tables
//! carry the exact numbers.

use super::losses::LossSeries;
use super::{known_method, Row, Table, NO_SCHEDULE};
use crate::eval::checkpoints::{StepScores, PROTOCOLS};
use crate::eval::summary::{Metrics, Stat};
use crate::personalize::method::Method;
use anyhow::{anyhow, Context, Result};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;
use std::sync::OnceLock;

static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
/// The family name the plots ask for.
pub(super) const FONT: &str = "sans-serif";

/// Register the bundled font with plotters (once per process).
pub(super) fn ensure_font() -> Result<()> {
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

/// A method family: the colour groups of the bubble chart (the paper's Fig. 5), each base
/// method drawn in its family's colour with its + variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// ti, ti+.
    TextualInversion,
    /// neti, neti+.
    Neti,
    /// dreambooth, dreambooth-lora, dreambooth-lora+.
    DreamBooth,
    /// custom-diffusion.
    CustomDiffusion,
}

impl Family {
    /// The families in legend order (their colours are the first four of [`COLORS`]).
    pub const ALL: [Family; 4] = [
        Family::TextualInversion,
        Family::Neti,
        Family::DreamBooth,
        Family::CustomDiffusion,
    ];

    /// The family of a method.
    pub fn of(method: Method) -> Family {
        match method {
            Method::Ti | Method::TiPlus => Family::TextualInversion,
            Method::Neti | Method::NetiPlus => Family::Neti,
            Method::DreamBooth | Method::DreamBoothLora | Method::DreamBoothLoraPlus => {
                Family::DreamBooth
            }
            Method::CustomDiffusion => Family::CustomDiffusion,
        }
    }

    /// The family of a method name as the tables spell it; `None` for names no method has.
    pub fn of_name(method: &str) -> Option<Family> {
        known_method(method).map(Family::of)
    }

    /// The legend's name of the family.
    pub fn name(self) -> &'static str {
        match self {
            Family::TextualInversion => "Textual Inversion",
            Family::Neti => "NeTI",
            Family::DreamBooth => "DreamBooth",
            Family::CustomDiffusion => "Custom Diffusion",
        }
    }

    /// The family's colour.
    pub fn color(self) -> RGBColor {
        color(Family::ALL.iter().position(|f| *f == self).unwrap_or(0))
    }
}

/// One bubble of the method chart: a table row with finite DINO and CLIP-I.
#[derive(Clone, Debug, PartialEq)]
pub struct Bubble {
    pub method: String,
    pub schedule: String,
    /// `method` or `method schedule`.
    pub label: String,
    /// DINO.
    pub x: f64,
    /// CLIP-I.
    pub y: f64,
    /// Pixels; the area grows linearly with CLIP-T.
    pub radius: i32,
    /// The method's family (`None`: a method name attractor does not know).
    pub family: Option<Family>,
    pub color: RGBColor,
}

/// An arrow of the method chart, from a base method's bubble to one of its + variant's
/// (indices into [`BubbleLayout::bubbles`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrow {
    pub from: usize,
    pub to: usize,
}

/// A legend entry of the method chart: a family, or a method name no family has.
#[derive(Clone, Debug, PartialEq)]
pub struct LegendEntry {
    pub name: String,
    pub color: RGBColor,
}

/// Everything the method chart draws, computed from a table (see [`bubble_layout`]).
#[derive(Clone, Debug, PartialEq)]
pub struct BubbleLayout {
    pub bubbles: Vec<Bubble>,
    pub arrows: Vec<Arrow>,
    /// The families present (in [`Family::ALL`] order), then unknown methods (in table order).
    pub legend: Vec<LegendEntry>,
    /// DINO axis range.
    pub x_range: (f64, f64),
    /// CLIP-I axis range.
    pub y_range: (f64, f64),
    /// The smallest and largest finite CLIP-T (`None`: no finite value).
    pub clip_t_range: Option<(f64, f64)>,
}

/// The method chart's contents: a bubble per row at (DINO, CLIP-I), sized by CLIP-T and
/// coloured by method family; an arrow from each base method's bubble (ti, neti,
/// dreambooth-lora) to each bubble of its + variant (one per schedule) when both are in the
/// table, as the paper's Fig. 5 draws the effect of the attractor.
pub fn bubble_layout(table: &Table) -> BubbleLayout {
    let rows = &table.rows;
    let dino: Vec<Stat> = rows.iter().map(|r| r.metrics.dino).collect();
    let clip_i: Vec<Stat> = rows.iter().map(|r| r.metrics.clip_i).collect();
    let x_range = value_range(&dino);
    let y_range = value_range(&clip_i);
    let finite_ct = || {
        rows.iter()
            .map(|r| r.metrics.clip_t.mean)
            .filter(|v| v.is_finite())
    };
    let ct_lo = finite_ct().fold(f64::INFINITY, f64::min);
    let ct_hi = finite_ct().fold(f64::NEG_INFINITY, f64::max);
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
    // Legend: the families present, then each unknown method with a colour of its own.
    let mut legend: Vec<LegendEntry> = Family::ALL
        .iter()
        .filter(|f| rows.iter().any(|r| Family::of_name(&r.method) == Some(**f)))
        .map(|f| LegendEntry {
            name: f.name().to_string(),
            color: f.color(),
        })
        .collect();
    let mut others: Vec<String> = Vec::new();
    for r in rows {
        if Family::of_name(&r.method).is_none() && !others.contains(&r.method) {
            others.push(r.method.clone());
        }
    }
    let other_color = |m: &str| {
        let k = others.iter().position(|o| o == m).unwrap_or(0);
        color(Family::ALL.len() + k)
    };
    legend.extend(others.iter().map(|m| LegendEntry {
        name: m.clone(),
        color: other_color(m),
    }));
    let bubbles: Vec<Bubble> = rows
        .iter()
        .filter(|r| r.metrics.dino.mean.is_finite() && r.metrics.clip_i.mean.is_finite())
        .map(|r| {
            let family = Family::of_name(&r.method);
            Bubble {
                method: r.method.clone(),
                schedule: r.schedule.clone(),
                label: if r.schedule == NO_SCHEDULE {
                    r.method.clone()
                } else {
                    format!("{} {}", r.method, r.schedule)
                },
                x: r.metrics.dino.mean,
                y: r.metrics.clip_i.mean,
                radius: radius(r.metrics.clip_t.mean),
                family,
                color: family.map_or_else(|| other_color(&r.method), Family::color),
            }
        })
        .collect();
    let mut arrows = Vec::new();
    for (to, b) in bubbles.iter().enumerate() {
        let Some(plus) = known_method(&b.method).filter(|m| m.uses_attractor()) else {
            continue;
        };
        let base = plus.base().name();
        for (from, a) in bubbles.iter().enumerate() {
            if a.method == base {
                arrows.push(Arrow { from, to });
            }
        }
    }
    BubbleLayout {
        bubbles,
        arrows,
        legend,
        x_range,
        y_range,
        clip_t_range: (ct_hi >= ct_lo).then_some((ct_lo, ct_hi)),
    }
}

/// An arrow in pixels: the shaft's two ends and the head's three corners (tip first).
pub type ArrowPixels = ([(i32, i32); 2], [(i32, i32); 3]);

/// An arrow between two bubbles in pixels: the shaft (from the rim of the `from` bubble to
/// the head's base) and the head (a triangle whose tip touches the rim of the `to` bubble).
/// Bubbles that overlap get a centre-to-centre arrow; `None` when the centres coincide.
pub fn arrow_geometry(
    from: (i32, i32),
    r_from: i32,
    to: (i32, i32),
    r_to: i32,
) -> Option<ArrowPixels> {
    const HEAD_LEN: f64 = 14.0;
    const HEAD_HALF_WIDTH: f64 = 6.0;
    let (fx, fy) = (from.0 as f64, from.1 as f64);
    let (dx, dy) = (to.0 as f64 - fx, to.1 as f64 - fy);
    let d = dx.hypot(dy);
    if d < 1.0 {
        return None;
    }
    let (ux, uy) = (dx / d, dy / d);
    let (r0, r1) = (r_from.max(0) as f64 + 2.0, r_to.max(0) as f64 + 2.0);
    // Room for a visible shaft and the head between the rims, else centre to centre.
    let (s, e) = if d > r0 + r1 + HEAD_LEN + 6.0 {
        (r0, d - r1)
    } else {
        (0.0, d)
    };
    let at = |t: f64| (fx + ux * t, fy + uy * t);
    let px = |(x, y): (f64, f64)| (x.round() as i32, y.round() as i32);
    let tip = at(e);
    let head_base = at((e - HEAD_LEN).max(s));
    let (nx, ny) = (-uy * HEAD_HALF_WIDTH, ux * HEAD_HALF_WIDTH);
    let shaft = [px(at(s)), px(head_base)];
    let head = [
        px(tip),
        px((head_base.0 + nx, head_base.1 + ny)),
        px((head_base.0 - nx, head_base.1 - ny)),
    ];
    Some((shaft, head))
}

/// The method bubble chart (PNG): x DINO, y CLIP-I, bubble area growing with CLIP-T, one
/// colour per method family, each bubble labelled `method schedule`, arrows from each base
/// method to its + variant (see [`bubble_layout`]), a legend naming the families.
pub fn method_bubbles(table: &Table) -> Result<Vec<u8>> {
    let layout = bubble_layout(table);
    let (x0, x1) = layout.x_range;
    let (y0, y1) = layout.y_range;
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
        // Bubbles, then the arrows over them, then the labels over everything.
        for b in &layout.bubbles {
            let bubble = EmptyElement::at((b.x, b.y))
                + Circle::new((0, 0), b.radius, b.color.mix(0.45).filled())
                + Circle::new((0, 0), b.radius, b.color.stroke_width(2));
            chart.draw_series(std::iter::once(bubble)).map_err(err)?;
        }
        for a in &layout.arrows {
            let (f, t) = (&layout.bubbles[a.from], &layout.bubbles[a.to]);
            let Some((shaft, head)) = arrow_geometry(
                chart.backend_coord(&(f.x, f.y)),
                f.radius,
                chart.backend_coord(&(t.x, t.y)),
                t.radius,
            ) else {
                continue;
            };
            root.draw(&PathElement::new(shaft.to_vec(), t.color.stroke_width(3)))
                .map_err(err)?;
            root.draw(&Polygon::new(head.to_vec(), t.color.filled()))
                .map_err(err)?;
        }
        for b in &layout.bubbles {
            let label = EmptyElement::at((b.x, b.y))
                + Text::new(
                    b.label.clone(),
                    (b.radius + 4, 0),
                    (FONT, 15)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Left, VPos::Center)),
                );
            chart.draw_series(std::iter::once(label)).map_err(err)?;
        }
        let mut note = match layout.clip_t_range {
            Some((lo, hi)) => format!(
                "bubble area: CLIP-T from {lo:.4} (smallest) to {hi:.4} (largest); colour: method family"
            ),
            None => "no CLIP-T values; colour: method family".to_string(),
        };
        if !layout.arrows.is_empty() {
            note.push_str("; arrow: base method -> its + variant");
        }
        legend
            .draw(&Text::new(
                note,
                (20, 10),
                (FONT, 16).into_font().color(&BLACK),
            ))
            .map_err(err)?;
        let mut x = 20;
        for e in &layout.legend {
            legend
                .draw(&Circle::new((x + 8, 48), 8, e.color.filled()))
                .map_err(err)?;
            legend
                .draw(&Text::new(
                    e.name.clone(),
                    (x + 22, 48),
                    (FONT, 16)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Left, VPos::Center)),
                ))
                .map_err(err)?;
            x += 40 + 9 * e.name.len() as i32;
        }
        if !layout.arrows.is_empty() {
            if let Some((shaft, head)) = arrow_geometry((x, 48), 0, (x + 36, 48), 0) {
                legend
                    .draw(&PathElement::new(shaft.to_vec(), BLACK.stroke_width(3)))
                    .map_err(err)?;
                legend
                    .draw(&Polygon::new(head.to_vec(), BLACK.filled()))
                    .map_err(err)?;
            }
            legend
                .draw(&Text::new(
                    "with the attractor (+)",
                    (x + 44, 48),
                    (FONT, 16)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Left, VPos::Center)),
                ))
                .map_err(err)?;
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

/// Held-out and training-reference loss over training steps (PNG; issue 23): one panel per
/// subject (two panels a row), a colour per (method, schedule), the held-out loss solid with
/// dots and the training-reference loss dashed. A run whose held-out loss rises while its
/// training-reference loss keeps falling is overfitting.
pub fn loss_curves(series: &[LossSeries]) -> Result<Vec<u8>> {
    let mut subjects: Vec<&str> = series.iter().map(|s| s.subject.as_str()).collect();
    subjects.dedup();
    // Colours by label, the same in every panel.
    let mut labels: Vec<String> = Vec::new();
    for s in series {
        let l = s.label();
        if !labels.contains(&l) {
            labels.push(l);
        }
    }
    let cols = if subjects.len() > 1 { 2 } else { 1 };
    let rows = subjects.len().div_ceil(cols).max(1);
    let (pw, ph) = (720u32, 400u32);
    render(pw * cols as u32, 60 + ph * rows as u32, |root| {
        let area = root
            .titled(
                "Held-out loss (solid) and training-reference loss (dashed) over training",
                (FONT, 24),
            )
            .map_err(err)?;
        let panels = area.split_evenly((rows, cols));
        for (panel, subject) in panels.iter().zip(&subjects) {
            let mine: Vec<&LossSeries> = series.iter().filter(|s| s.subject == *subject).collect();
            let steps = mine
                .iter()
                .flat_map(|s| s.points.iter().map(|p| p.step as f64));
            let (x_lo, x_hi) = steps.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
                (a.min(x), b.max(x))
            });
            let pad = ((x_hi - x_lo) * 0.05).max(0.5);
            let vals: Vec<Stat> = mine
                .iter()
                .flat_map(|s| s.points.iter())
                .flat_map(|p| [p.heldout, p.train_ref])
                .flatten()
                .map(|v| Stat { mean: v, se: None })
                .collect();
            let (lo, hi) = value_range(&vals);
            let mut chart = ChartBuilder::on(panel)
                .caption(*subject, (FONT, 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d((x_lo - pad)..(x_hi + pad), lo..hi)
                .map_err(err)?;
            chart
                .configure_mesh()
                .max_light_lines(1)
                .x_desc("training step")
                .y_desc("loss")
                .x_label_formatter(&|x| {
                    if (x - x.round()).abs() < 1e-9 {
                        format!("{x:.0}")
                    } else {
                        String::new()
                    }
                })
                .y_label_formatter(&|y| format!("{y:.4}"))
                .label_style((FONT, 15))
                .axis_desc_style((FONT, 17))
                .draw()
                .map_err(err)?;
            for s in &mine {
                let label = s.label();
                let c = color(labels.iter().position(|l| *l == label).unwrap_or(0));
                let held: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .filter_map(|p| p.heldout.map(|v| (p.step as f64, v)))
                    .collect();
                let train: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .filter_map(|p| p.train_ref.map(|v| (p.step as f64, v)))
                    .collect();
                if !held.is_empty() {
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            held.clone(),
                            c.stroke_width(3),
                        )))
                        .map_err(err)?
                        .label(label.clone())
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3))
                        });
                    chart
                        .draw_series(held.iter().map(|p| Circle::new(*p, 4, c.filled())))
                        .map_err(err)?;
                }
                if !train.is_empty() {
                    chart
                        .draw_series(std::iter::once(plotters::element::DashedPathElement::new(
                            train.clone(),
                            8,
                            6,
                            c.stroke_width(2),
                        )))
                        .map_err(err)?;
                    chart
                        .draw_series(train.iter().map(|p| TriangleMarker::new(*p, 5, c.filled())))
                        .map_err(err)?;
                }
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font((FONT, 15))
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

    /// Every method has its family: TI, NeTI, DreamBooth (with its LoRA forms), Custom
    /// Diffusion; a + variant shares its base method's family and colour.
    #[test]
    fn families_of_every_method() {
        use Family::*;
        for (name, family) in [
            ("ti", TextualInversion),
            ("ti+", TextualInversion),
            ("neti", Neti),
            ("neti+", Neti),
            ("dreambooth", DreamBooth),
            ("dreambooth-lora", DreamBooth),
            ("dreambooth-lora+", DreamBooth),
            ("custom-diffusion", CustomDiffusion),
        ] {
            assert_eq!(Family::of_name(name), Some(family), "{name}");
        }
        for m in Method::ALL {
            assert_eq!(Family::of(m), Family::of(m.base()), "{m}");
            if let Some(p) = m.plus() {
                assert_eq!(Family::of(p), Family::of(m), "{m}");
            }
        }
        assert_eq!(Family::of_name("zzz"), None);
        assert_eq!(Family::of_name("TI"), None);
        // Four distinct colours, four names.
        let colors: Vec<RGBColor> = Family::ALL.iter().map(|f| f.color()).collect();
        for (i, a) in colors.iter().enumerate() {
            assert!(colors[i + 1..].iter().all(|b| b != a), "{colors:?}");
        }
        assert_eq!(
            Family::ALL.map(Family::name),
            [
                "Textual Inversion",
                "NeTI",
                "DreamBooth",
                "Custom Diffusion"
            ]
        );
    }

    /// Arrows go from a base method's bubble to each bubble of its + variant, only when both
    /// are in the table; colours follow the family; the legend names the families present.
    #[test]
    fn arrows_only_for_present_pairs() {
        let table = Table {
            split: Split::Test,
            rows: vec![
                row("ti", NO_SCHEDULE, 0.0),
                row("dreambooth", NO_SCHEDULE, 0.01),
                row("dreambooth-lora", NO_SCHEDULE, 0.02),
                row("custom-diffusion", NO_SCHEDULE, 0.03),
                row("ti+", "zero", 0.04),
                row("ti+", "cosine", 0.05),
                // neti+ without neti: no arrow.
                row("neti+", "cosine", 0.06),
                row("zzz", NO_SCHEDULE, 0.07),
            ],
        };
        let l = bubble_layout(&table);
        let name = |i: usize| l.bubbles[i].label.clone();
        let arrows: Vec<(String, String)> = l
            .arrows
            .iter()
            .map(|a| (name(a.from), name(a.to)))
            .collect();
        assert_eq!(
            arrows,
            [
                ("ti".to_string(), "ti+ zero".to_string()),
                ("ti".to_string(), "ti+ cosine".to_string())
            ]
        );
        let by = |label: &str| l.bubbles.iter().find(|b| b.label == label).unwrap();
        assert_eq!(by("ti").color, by("ti+ cosine").color);
        assert_eq!(by("dreambooth").color, by("dreambooth-lora").color);
        assert_ne!(by("dreambooth").color, by("custom-diffusion").color);
        assert_ne!(by("ti").color, by("neti+ cosine").color);
        assert_eq!(by("ti").color, Family::TextualInversion.color());
        assert_eq!(by("zzz").family, None);
        assert!(Family::ALL.iter().all(|f| f.color() != by("zzz").color));
        assert_eq!(
            l.legend.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            [
                "Textual Inversion",
                "NeTI",
                "DreamBooth",
                "Custom Diffusion",
                "zzz"
            ]
        );
        // Adding the missing bases draws their arrows: neti -> neti+, dreambooth-lora ->
        // dreambooth-lora+ (dreambooth and custom-diffusion have no + variant).
        let mut all = table.clone();
        all.rows.push(row("neti", NO_SCHEDULE, 0.08));
        all.rows.push(row("dreambooth-lora+", "cosine", 0.09));
        let l = bubble_layout(&all);
        let name = |i: usize| l.bubbles[i].label.clone();
        let mut arrows: Vec<(String, String)> = l
            .arrows
            .iter()
            .map(|a| (name(a.from), name(a.to)))
            .collect();
        arrows.sort();
        assert_eq!(
            arrows,
            [
                ("dreambooth-lora", "dreambooth-lora+ cosine"),
                ("neti", "neti+ cosine"),
                ("ti", "ti+ cosine"),
                ("ti", "ti+ zero"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        // A base without its + variant, or a table of base methods only: no arrows.
        let bases = Table {
            split: Split::Train,
            rows: vec![
                row("ti", NO_SCHEDULE, 0.0),
                row("dreambooth-lora", NO_SCHEDULE, 0.1),
            ],
        };
        assert!(bubble_layout(&bases).arrows.is_empty());
        // Rows without finite coordinates get no bubble and no arrow.
        let mut nan = table.clone();
        nan.rows[0].metrics.dino.mean = f64::NAN;
        let l = bubble_layout(&nan);
        assert_eq!(l.bubbles.len(), table.rows.len() - 1);
        assert!(l.arrows.is_empty());
    }

    /// The arrow runs from rim to rim along the line between the centres, its head's tip on the
    /// target's rim; overlapping bubbles get a centre-to-centre arrow; coinciding ones none.
    #[test]
    fn arrow_geometry_rim_to_rim() {
        let (shaft, head) = arrow_geometry((100, 100), 10, (200, 100), 20).unwrap();
        assert_eq!(shaft[0], (112, 100));
        assert_eq!(head[0], (178, 100));
        assert_eq!(shaft[1], (164, 100));
        assert_eq!(head[1], (164, 106));
        assert_eq!(head[2], (164, 94));
        let (shaft, head) = arrow_geometry((100, 100), 30, (100, 140), 30).unwrap();
        assert_eq!(shaft[0], (100, 100));
        assert_eq!(head[0], (100, 140));
        assert!(arrow_geometry((5, 5), 10, (5, 5), 10).is_none());
    }

    /// The chart with all eight methods renders: each family's colour and the arrows' pixels.
    #[test]
    fn bubbles_of_all_eight_methods_render() {
        let rows: Vec<Row> = Method::ALL
            .iter()
            .enumerate()
            .map(|(k, m)| {
                let s = if m.uses_attractor() {
                    "cosine"
                } else {
                    NO_SCHEDULE
                };
                row(m.name(), s, k as f64 * 0.02)
            })
            .collect();
        let table = Table {
            split: Split::Test,
            rows,
        };
        assert_eq!(bubble_layout(&table).arrows.len(), 3);
        let img = image::load_from_memory(&method_bubbles(&table).unwrap())
            .unwrap()
            .to_rgb8();
        assert_eq!(img.dimensions(), (960, 800));
        for f in Family::ALL {
            let c = f.color();
            let n = img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count();
            assert!(n > 150, "{f:?}: {n} pixels of {c:?}");
        }
        // Without the + variants: no arrows, and the chart still renders.
        let bases = Table {
            split: Split::Test,
            rows: table
                .rows
                .iter()
                .filter(|r| r.schedule == NO_SCHEDULE)
                .cloned()
                .collect(),
        };
        assert!(bubble_layout(&bases).arrows.is_empty());
        method_bubbles(&bases).unwrap();
    }

    /// The plots render to PNGs of the expected size with text and colour on them.
    /// Two subjects, two runs each: held-out and training-reference losses at 3 steps.
    fn loss_series() -> Vec<LossSeries> {
        let mut out = Vec::new();
        for subject in ["cat", "dog"] {
            for (k, (m, s)) in [("ti", NO_SCHEDULE), ("ti+", "cosine")].iter().enumerate() {
                out.push(LossSeries {
                    subject: subject.into(),
                    method: m.to_string(),
                    schedule: s.to_string(),
                    run_dir: "run".into(),
                    points: (1..=3)
                        .map(|i| super::super::losses::LossPoint {
                            step: i * 10,
                            heldout: Some(0.2 + 0.01 * (i as f64 - 2.0).powi(2) + 0.02 * k as f64),
                            train_ref: Some(0.2 - 0.02 * i as f64),
                        })
                        .collect(),
                });
            }
        }
        out
    }

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
            (loss_curves(&loss_series()).unwrap(), (1440, 460)),
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
