//! What training writes: PEFT adapter directories (what peft loads and tandem
//! serves), checkpoints that resume a run, `metrics.jsonl`, the lineage in
//! `training_metadata.json`, and the loss curve as a PNG.
//!
//! Every file is written to a temporary name, synced, then renamed, and a
//! checkpoint directory is renamed into place only once complete: a crash
//! leaves the previous state, never a half-written one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::loader::safetensors::{serialize_with_metadata, SafetensorsFile, StDtype};
use crate::lora::LoraTarget;

use super::lora::{HostFactor, LoraSpec};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const METADATA: &str = "training_metadata.json";
pub const METRICS: &str = "metrics.jsonl";
pub const LOSS_PLOT: &str = "loss.png";

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct OutputError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> OutputError + '_ {
    move |source| OutputError { path: path.to_owned(), source }
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), OutputError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        // The rename is durable once the directory is synced.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// PEFT's key for a factor's A or B.
pub fn peft_key(layer: usize, target: LoraTarget, b: bool) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.lora_{}.weight",
        target.parent(),
        target.module(),
        if b { "B" } else { "A" }
    )
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `adapter_config.json` as peft's `save_pretrained` writes it for this adapter.
pub fn adapter_config(spec: &LoraSpec, base_model: &str) -> Value {
    let mut targets: Vec<&str> = spec.targets.iter().map(|t| t.module()).collect();
    targets.sort_unstable();
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": spec.alpha,
        "lora_bias": false,
        "lora_dropout": spec.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": spec.rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": spec.use_rslora,
    })
}

/// The safetensors bytes of `factors` under PEFT's names (A `[r, in]`, B `[out, r]`).
pub fn adapter_weights(factors: &[HostFactor]) -> Vec<u8> {
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(2 * factors.len());
    for f in factors {
        let (inf, outf) = (f.a.len() / f.rank, f.b.len() / f.rank);
        owned.push((peft_key(f.layer, f.target, false), vec![f.rank, inf], f32_bytes(&f.a)));
        owned.push((peft_key(f.layer, f.target, true), vec![outf, f.rank], f32_bytes(&f.b)));
    }
    owned.sort_by(|a, b| a.0.cmp(&b.0));
    let views: Vec<(&str, StDtype, &[usize], &[u8])> =
        owned.iter().map(|(n, s, d)| (n.as_str(), StDtype::F32, s.as_slice(), d.as_slice())).collect();
    serialize_with_metadata(&views, &[("format", "pt")])
}

/// Writes a PEFT adapter directory (created if missing; files replaced atomically).
pub fn write_adapter(dir: &Path, spec: &LoraSpec, base_model: &str, factors: &[HostFactor]) -> Result<(), OutputError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    write_atomic(&dir.join(ADAPTER_WEIGHTS), &adapter_weights(factors))?;
    let config = serde_json::to_vec_pretty(&adapter_config(spec, base_model)).expect("JSON serialises");
    write_atomic(&dir.join(ADAPTER_CONFIG), &config)
}

/// Writes a whole directory: everything goes into `<dir>.partial` first, which
/// is renamed to `dir` (replacing an older one) once complete.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<(), OutputError>) -> Result<(), OutputError> {
    let partial = dir.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io_err(&partial))?;
    }
    std::fs::create_dir_all(&partial).map_err(io_err(&partial))?;
    fill(&partial)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io_err(dir))?;
    }
    std::fs::rename(&partial, dir).map_err(io_err(dir))?;
    if let Some(parent) = dir.parent() {
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Named f32 tensors as safetensors (optimiser state in checkpoints).
pub fn tensors_file(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, v)| f32_bytes(v)).collect();
    let views: Vec<(&str, StDtype, &[usize], &[u8])> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| (n.as_str(), StDtype::F32, s.as_slice(), b.as_slice()))
        .collect();
    serialize_with_metadata(&views, &[("format", "pt")])
}

/// Reads back a file of [`tensors_file`]: name → values.
pub fn read_tensors(path: &Path) -> Result<std::collections::BTreeMap<String, Vec<f32>>, String> {
    let f = SafetensorsFile::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = std::collections::BTreeMap::new();
    for name in f.names() {
        let t = f.tensor(name).ok_or_else(|| format!("{}: tensor {name} has no data", path.display()))?;
        if t.dtype != StDtype::F32 {
            return Err(format!("{}: tensor {name} is {:?}, expected F32", path.display(), t.dtype));
        }
        let v = t.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        out.insert(name.to_string(), v);
    }
    Ok(out)
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, OutputError> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io_err(path))?;
    Ok(format!("{:x}", h.finalize()))
}

/// One point of the loss curve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurvePoint {
    pub step: usize,
    pub loss: f64,
}

/// Draws the training loss (and validation loss, where evaluated) against the
/// optimiser step into a PNG.
pub fn plot_loss(path: &Path, train: &[CurvePoint], valid: &[CurvePoint], title: &str) -> Result<(), String> {
    use plotters::prelude::*;
    static FONT: std::sync::Once = std::sync::Once::new();
    FONT.call_once(|| {
        // The font travels in the binary: no system font is needed.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
    if train.is_empty() {
        return Err("no training steps to plot".into());
    }
    let tmp = path.with_extension(format!("tmp-{}.png", std::process::id()));
    {
        let root = BitMapBackend::new(&tmp, (900, 520)).into_drawing_area();
        let e = |e: &dyn std::fmt::Display| e.to_string();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let all = train.iter().chain(valid);
        let max_step = all.clone().map(|p| p.step).max().unwrap_or(1).max(1) as f64;
        let finite = |p: &&CurvePoint| p.loss.is_finite();
        let hi = all.clone().filter(finite).map(|p| p.loss).fold(0f64, f64::max);
        let lo = all.filter(finite).map(|p| p.loss).fold(f64::INFINITY, f64::min).min(hi);
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..max_step, (lo - pad).max(0.0)..hi + pad)
            .map_err(|x| e(&x))?;
        chart.configure_mesh().x_desc("optimizer step").y_desc("loss").draw().map_err(|x| e(&x))?;
        let line = |pts: &[CurvePoint]| {
            pts.iter().filter(|p| p.loss.is_finite()).map(|p| (p.step as f64, p.loss)).collect::<Vec<_>>()
        };
        chart
            .draw_series(LineSeries::new(line(train), &BLUE))
            .map_err(|x| e(&x))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        if !valid.is_empty() {
            let red = RGBColor(200, 30, 30);
            chart
                .draw_series(LineSeries::new(line(valid), red.stroke_width(2)))
                .map_err(|x| e(&x))?
                .label("validation")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], red));
            chart.draw_series(line(valid).into_iter().map(|p| Circle::new(p, 3, red.filled()))).map_err(|x| e(&x))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))?;
    }
    std::fs::rename(&tmp, path).map_err(|x| format!("{}: {x}", path.display()))
}
