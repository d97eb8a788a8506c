//! The CUDA kernels (kernels/*.cu) run on the CPU through the emulator in
//! kernels/emu/ (g++ and a shim; no GPU needed) and are checked against the CPU
//! backend, the reference. Protocol: kernels/emu/emu_main.cpp.
//!
//! Without g++ the tests print why and pass, except under CI (env CI set),
//! where a missing compiler fails them. KERNEL_EMU_SANITIZE=thread (data races:
//! a missing __syncthreads) or =address (out-of-bounds, undefined behaviour)
//! builds the emulator with that sanitizer; any report fails the test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tandem::backend::cpu::{CpuBackend, CpuKvCache, CpuTensor, CpuWeight};
use tandem::backend::{
    AttentionMeta, Backend, HostWeight, KvCacheSpec, LoraSegment, MatmulJob, RopeStyle, RopeTable, SeqAttention,
    WeightBytes,
};
use tandem::kv::BlockId;
use tandem::lora::{LoraMatrix, LoraValues};
use tandem::quant::ggml::{dequantize, WeightKind};
use tandem::quant::random::random_weight_bytes;

// ---- the emulator ----

/// The emulator binary, built once per test run (again only when a source is
/// newer than it); `None` when there is no g++ outside CI.
fn emulator() -> Option<&'static Path> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    BIN.get_or_init(build_emulator).as_deref()
}

fn build_emulator() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if Command::new("g++").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "g++ is needed to emulate the CUDA kernels in CI");
        eprintln!("skipped: no g++ to build the CUDA kernel emulator");
        return None;
    }
    let sanitize = std::env::var("KERNEL_EMU_SANITIZE").unwrap_or_default();
    let flags: &[&str] = match sanitize.as_str() {
        "" => &["-O2"],
        "thread" => &["-O1", "-g", "-fsanitize=thread"],
        "address" => &["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"],
        s => panic!("KERNEL_EMU_SANITIZE={s}: want thread or address"),
    };
    let bin = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kernel-emu{sanitize}"));
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut sources = vec![];
    for dir in [root.join("kernels"), root.join("kernels/emu")] {
        sources.extend(std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_file()));
    }
    let built = modified(&bin);
    if built.is_some() && sources.iter().all(|s| modified(s) <= built) {
        return Some(bin);
    }
    let tmp = bin.with_extension("tmp");
    let out = Command::new("g++")
        .args(flags)
        .args(["-std=c++20", "-pthread", "-Wno-unknown-pragmas", "-o"])
        .arg(&tmp)
        .arg(root.join("kernels/emu/emu_main.cpp"))
        .output()
        .unwrap();
    assert!(out.status.success(), "building the kernel emulator failed:\n{}", String::from_utf8_lossy(&out.stderr));
    std::fs::rename(&tmp, &bin).unwrap();
    Some(bin)
}

/// One kernel argument (see the protocol in kernels/emu/emu_main.cpp).
enum Arg {
    /// A device buffer; holds what the kernel left in it after the run.
    B(Vec<u8>),
    I(i32),
    L(i64),
    F(f32),
    Null,
    /// Addresses of the given `B` arguments (0-based among the `B`s).
    A(Vec<usize>),
}

/// Runs `kernel` over `grid` × `block` threads; buffers are updated in place.
fn launch(emu: &Path, kernel: &str, grid: [u32; 3], block: [u32; 3], args: &mut [Arg]) {
    let dir = tempfile::tempdir().unwrap();
    let dims = |d: [u32; 3]| format!("{},{},{}", d[0], d[1], d[2]);
    let mut cmd = Command::new(emu);
    cmd.arg(kernel).arg(dims(grid)).arg(dims(block)).env("KERNEL_EMU_TIMEOUT_S", "120");
    cmd.env("TSAN_OPTIONS", "halt_on_error=1:exitcode=66");
    for (i, a) in args.iter().enumerate() {
        cmd.arg(match a {
            Arg::B(bytes) => {
                let p = dir.path().join(format!("{i}.bin"));
                std::fs::write(&p, bytes).unwrap();
                format!("b:{}", p.display())
            }
            Arg::I(v) => format!("i:{v}"),
            Arg::L(v) => format!("l:{v}"),
            Arg::F(v) => format!("f:{v}"),
            Arg::Null => "n".into(),
            Arg::A(ks) => format!("a:{}", ks.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(",")),
        });
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "kernel-emu {kernel} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for (i, a) in args.iter_mut().enumerate() {
        if let Arg::B(bytes) = a {
            *bytes = std::fs::read(dir.path().join(format!("{i}.bin"))).unwrap();
        }
    }
}

/// A buffer holding a slice of numbers (f32, u32, i32), little endian.
macro_rules! buf {
    ($v:expr) => {
        Arg::B($v.iter().flat_map(|x| x.to_le_bytes()).collect())
    };
}
/// A buffer of `n` floats of NaN, so an element the kernel never writes fails.
fn nan_buf(n: usize) -> Arg {
    buf!(vec![f32::NAN; n])
}
/// `i:` arguments.
fn ints<const N: usize>(v: [usize; N]) -> [Arg; N] {
    v.map(|x| Arg::I(x as i32))
}
fn take(a: &mut Arg) -> Arg {
    std::mem::replace(a, Arg::Null)
}
fn bytes(a: &Arg) -> &[u8] {
    match a {
        Arg::B(b) => b,
        _ => panic!("not a buffer"),
    }
}
fn f32s(a: &Arg) -> Vec<f32> {
    bytes(a).chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}
fn u16s(a: &Arg) -> Vec<u16> {
    bytes(a).chunks_exact(2).map(|c| u16::from_le_bytes(c.try_into().unwrap())).collect()
}
fn u32s(a: &Arg) -> Vec<u32> {
    bytes(a).chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
}

// ---- comparisons ----

/// Asserts |got - want| <= tol * scale for every element (a NaN never passes)
/// and prints the worst error relative to its scale.
fn check(what: &str, got: &[f32], want: &[f32], scale: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = 0f32;
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        let e = (g - w).abs() / s.max(f32::MIN_POSITIVE);
        assert!(e <= tol, "{what}[{i}]: got {g:e}, want {w:e} (error {e:e} of scale {s:e}, tol {tol:e})");
        worst = worst.max(e);
    }
    println!("{what}: max error {worst:.2e} (tolerance {tol:.0e})");
}

/// Each element's own magnitude as its scale (elementwise ops).
fn elem_scale(want: &[f32]) -> Vec<f32> {
    want.iter().map(|w| w.abs()).collect()
}

/// The largest magnitude of each `row`-element row as the scale of its elements.
fn row_scale(want: &[f32], row: usize) -> Vec<f32> {
    want.chunks(row).flat_map(|r| vec![r.iter().fold(0f32, |m, v| m.max(v.abs())); r.len()]).collect()
}

/// Bit-for-bit equality.
fn exact(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}[{i}]: got {g:e}, want {w:e}");
    }
    println!("{what}: exact");
}

// ---- reference side ----

fn rand_vec(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

fn weight(be: &CpuBackend, kind: WeightKind, rows: usize, cols: usize, b: Vec<u8>) -> CpuWeight {
    let h = HostWeight::new(format!("{kind:?}"), kind, rows, cols, WeightBytes::from_vec(b));
    be.load_weight(h).unwrap()
}

fn f32_weight(be: &CpuBackend, v: &[f32], rows: usize, cols: usize) -> CpuWeight {
    weight(be, WeightKind::F32, rows, cols, v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

fn tensor(v: &[f32], rows: usize, cols: usize) -> CpuTensor {
    CpuTensor { data: v.to_vec(), rows, cols }
}

/// Grid for a grid-stride elementwise kernel over `n` elements, 256 threads a block.
fn grid_for(n: usize) -> [u32; 3] {
    [n.div_ceil(256) as u32, 1, 1]
}
const B256: [u32; 3] = [256, 1, 1];
const B128: [u32; 3] = [128, 1, 1];

/// Every kernel the backend loads (launch.rs's kernel_names) is in the
/// emulator's table, so each can be (and below is) run against the CPU.
#[test]
fn emulator_knows_every_kernel_the_backend_loads() {
    let Some(emu) = emulator() else { return };
    let out = Command::new(emu).arg("--list").output().unwrap();
    assert!(out.status.success());
    let listed = String::from_utf8(out.stdout).unwrap();
    let listed: Vec<&str> = listed.lines().collect();
    for m in tandem::backend::cuda::nvrtc::KernelModule::ALL {
        for name in tandem::backend::cuda::launch::kernel_names(m) {
            assert!(listed.contains(&name.as_str()), "{}: kernel {name} is not in the emulator", m.file_name());
        }
    }
}

// ---- ops.cu ----

#[test]
fn ops_norms_and_residuals() {
    let Some(emu) = emulator() else { return };
    let be = CpuBackend::new(1).unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    for (rows, cols) in [(3usize, 80usize), (2, 1000)] {
        let x = rand_vec(&mut rng, rows * cols, -2.0, 2.0);
        let y = rand_vec(&mut rng, rows * cols, -2.0, 2.0);
        let w = rand_vec(&mut rng, cols, 0.5, 1.5);
        let wt = f32_weight(&be, &w, 1, cols);
        let (r, c, eps) = (rows as i32, cols as i32, 1e-5f32);
        let grid = [rows as u32, 1, 1];

        let mut want = be.zeros(rows, cols).unwrap();
        be.rms_norm(&tensor(&x, rows, cols), &wt, eps, &mut want).unwrap();
        let mut a = [buf!(&x), buf!(&w), nan_buf(rows * cols), Arg::I(r), Arg::I(c), Arg::F(eps)];
        launch(emu, "rms_norm", grid, B256, &mut a);
        check(&format!("rms_norm {rows}x{cols}"), &f32s(&a[2]), &want.data, &row_scale(&want.data, cols), 1e-6);

        let mut sum = tensor(&x, rows, cols);
        be.add_assign(&mut sum, &tensor(&y, rows, cols)).unwrap();
        be.rms_norm(&sum, &wt, eps, &mut want).unwrap();
        let mut a = [buf!(&x), buf!(&y), buf!(&w), nan_buf(rows * cols), Arg::I(r), Arg::I(c), Arg::F(eps)];
        launch(emu, "add_rms_norm", grid, B256, &mut a);
        exact(&format!("add_rms_norm {rows}x{cols} (x += y)"), &f32s(&a[0]), &sum.data);
        check(&format!("add_rms_norm {rows}x{cols}"), &f32s(&a[3]), &want.data, &row_scale(&want.data, cols), 1e-6);

        let n = rows * cols;
        let mut a = [buf!(&x), buf!(&y), Arg::L(n as i64)];
        launch(emu, "add_assign", grid_for(n), B256, &mut a);
        exact(&format!("add_assign {n}"), &f32s(&a[0]), &sum.data);

        let want: Vec<f32> = x.iter().enumerate().map(|(i, v)| v + w[i % cols]).collect();
        let mut a = [buf!(&x), buf!(&w), Arg::I(r), Arg::I(c)];
        launch(emu, "add_bias", [rows as u32, cols.div_ceil(256) as u32, 1], B256, &mut a);
        exact(&format!("add_bias {rows}x{cols}"), &f32s(&a[0]), &want);
    }
}

#[test]
fn ops_rope_silu_gather() {
    let Some(emu) = emulator() else { return };
    let be = CpuBackend::new(1).unwrap();
    let mut rng = StdRng::seed_from_u64(2);
    let (tokens, heads, d) = (3usize, 4usize, 64usize);
    let positions = [0u32, 17, 4000];
    let inv_freq: Vec<f32> = (0..d / 2).map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32)).collect();
    for (style, flag) in [(RopeStyle::Neox, 0), (RopeStyle::Interleaved, 1)] {
        // Direction 1 is rope, -1 its backward (the inverse rotation).
        for direction in [1.0f32, -1.0] {
            let x = rand_vec(&mut rng, tokens * heads * d, -1.0, 1.0);
            let mut want = tensor(&x, tokens, heads * d);
            let table = RopeTable { inv_freq: inv_freq.clone(), style };
            if direction > 0.0 {
                be.rope(&mut want, heads, d, &positions, &table).unwrap();
            } else {
                be.rope_backward(&mut want, heads, d, &positions, &table).unwrap();
            }
            let mut a = vec![buf!(&x), buf!(&positions), buf!(&inv_freq)];
            a.extend(ints([tokens, heads, d, flag]));
            a.push(Arg::F(direction));
            launch(emu, "rope", [tokens as u32, heads as u32, 1], [64, 1, 1], &mut a);
            let what = format!("rope {style:?} direction {direction}");
            check(&what, &f32s(&a[0]), &want.data, &row_scale(&want.data, d), 2e-6);
        }
    }

    let n = 1007;
    let g = rand_vec(&mut rng, n, -8.0, 8.0);
    let u = rand_vec(&mut rng, n, -2.0, 2.0);
    let mut want = be.zeros(1, n).unwrap();
    be.silu_mul(&tensor(&g, 1, n), &tensor(&u, 1, n), &mut want).unwrap();
    let mut a = [buf!(&g), buf!(&u), nan_buf(n), Arg::L(n as i64)];
    launch(emu, "silu_mul", grid_for(n), B256, &mut a);
    check("silu_mul", &f32s(&a[2]), &want.data, &elem_scale(&want.data), 1e-6);

    let (rows, cols) = (5, 80);
    let x = rand_vec(&mut rng, rows * cols, -1.0, 1.0);
    let pick = [4usize, 0, 4, 2];
    let want = be.gather_rows(&tensor(&x, rows, cols), &pick).unwrap();
    let ids: Vec<u32> = pick.iter().map(|&r| r as u32).collect();
    let mut a = [buf!(&x), buf!(&ids), nan_buf(pick.len() * cols), Arg::I(pick.len() as i32), Arg::I(cols as i32)];
    launch(emu, "gather_rows", [pick.len() as u32, 1, 1], B256, &mut a);
    exact("gather_rows", &f32s(&a[2]), &want.data);

    // Act-order columns: gather into stored order, scatter-add back.
    let cols = 300;
    let x = rand_vec(&mut rng, rows * cols, -1.0, 1.0);
    let mut perm: Vec<u32> = (0..cols as u32).collect();
    for i in (1..cols).rev() {
        perm.swap(i, rng.gen_range(0..=i));
    }
    let want: Vec<f32> =
        (0..rows).flat_map(|r| perm.iter().map(|&p| x[r * cols + p as usize]).collect::<Vec<_>>()).collect();
    let mut a = [buf!(&x), buf!(&perm), nan_buf(rows * cols), Arg::I(rows as i32), Arg::I(cols as i32)];
    launch(emu, "gather_cols", [2, 1, 1], B256, &mut a);
    exact("gather_cols", &f32s(&a[2]), &want);
    let dst0 = rand_vec(&mut rng, rows * cols, -1.0, 1.0);
    let mut want = dst0.clone();
    for r in 0..rows {
        for (j, &p) in perm.iter().enumerate() {
            want[r * cols + p as usize] += x[r * cols + j];
        }
    }
    let mut a = [buf!(&x), buf!(&perm), buf!(&dst0), Arg::I(rows as i32), Arg::I(cols as i32)];
    launch(emu, "scatter_add_cols", [rows as u32, 1, 1], B256, &mut a);
    exact("scatter_add_cols", &f32s(&a[2]), &want);
}

#[test]
fn ops_conversions_and_argmax() {
    let Some(emu) = emulator() else { return };
    let mut rng = StdRng::seed_from_u64(3);
    // Specials, f16 overflow / subnormal edges and exact bf16 rounding ties.
    let mut x = vec![0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e-40, 65504.0, 65519.0, 65520.0];
    x.extend([1e-8, -6e-8, 3.0e38, f32::MAX, f32::from_bits(0x3f80_8000), f32::from_bits(0x3f81_8000)]);
    x.extend([f32::from_bits(0x7f7f_ffff), f32::from_bits(0xff80_0001), 2.5e-5]);
    x.extend(rand_vec(&mut rng, 300, -100.0, 100.0));
    x.extend((0..300).map(|_| f32::from_bits(rng.gen())));
    let n = x.len();
    for (kernel, conv) in [
        ("f32_to_bf16_kernel", (|v| bf16::from_f32(v).to_bits()) as fn(f32) -> u16),
        ("f32_to_f16_kernel", |v| f16::from_f32(v).to_bits()),
    ] {
        let mut a = [buf!(&x), Arg::B(vec![0xAA; 2 * n]), Arg::L(n as i64)];
        launch(emu, kernel, grid_for(n), B256, &mut a);
        let is_nan =
            |b: u16| if kernel.contains("bf16") { bf16::from_bits(b).is_nan() } else { f16::from_bits(b).is_nan() };
        for (i, (&g, &v)) in u16s(&a[1]).iter().zip(&x).enumerate() {
            let w = conv(v);
            assert!(
                g == w || (is_nan(g) && is_nan(w)),
                "{kernel}({v:e} = {:#x}): got {g:#06x}, want {w:#06x} [{i}]",
                v.to_bits()
            );
        }
        println!("{kernel}: exact ({n} values)");
    }

    let (rows, vocab) = (3usize, 1000usize);
    let mut l = rand_vec(&mut rng, rows * vocab, -10.0, 10.0);
    l[vocab + 300] = 50.0; // a tie: the lower index wins
    l[vocab + 700] = 50.0;
    l[2 * vocab..].fill(-1.0);
    let mut a = [buf!(&l), Arg::I(rows as i32), Arg::I(vocab as i32), buf!([9u32; 3]), nan_buf(rows), nan_buf(rows)];
    launch(emu, "argmax_logsumexp", [rows as u32, 1, 1], B256, &mut a);
    let (idx, mx, lse) = (u32s(&a[3]), f32s(&a[4]), f32s(&a[5]));
    for (r, row) in l.chunks(vocab).enumerate() {
        let m = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let i = row.iter().position(|&v| v == m).unwrap() as u32;
        let s: f64 = row.iter().map(|&v| ((v - m) as f64).exp()).sum();
        let want_lse = (s.ln() + m as f64) as f32;
        assert_eq!((idx[r], mx[r]), (i, m), "argmax_logsumexp row {r}");
        check(&format!("argmax_logsumexp row {r} lse"), &lse[r..r + 1], &[want_lse], &[want_lse.abs().max(1.0)], 1e-6);
    }
}

// ---- kv.cu + attention.cu ----

/// The paged-attention setup the f32 and bf16 cache tests share: three
/// sequences over shuffled (so non-contiguous) blocks, GQA (4 query heads on 2
/// KV heads), keys in up to 3 partitions of 32, and 6 query rows, of which row
/// 4 belongs to no sequence (ctx 0).
struct PagedScene {
    nh: usize,
    kvh: usize,
    d: usize,
    bs: usize,
    num_blocks: usize,
    psize: usize,
    /// (context length, new tokens) per sequence, and its rows of `q`.
    seqs: [(usize, usize); 3],
    row_ranges: [std::ops::Range<usize>; 3],
    tables: Vec<Vec<BlockId>>,
    /// Every position of every sequence, in order: one write_kv fills the cache.
    slots: Vec<u32>,
    /// Key and value rows for `slots`, [slots.len(), kvh * d].
    k: Vec<f32>,
    v: Vec<f32>,
    /// [rows, nh * d].
    q: Vec<f32>,
    rows: usize,
}

impl PagedScene {
    fn new(rng: &mut StdRng) -> Self {
        let (nh, kvh, d, bs, num_blocks, psize) = (4usize, 2usize, 64usize, 16usize, 16usize, 32usize);
        let width = kvh * d;
        let seqs = [(70usize, 3usize), (5, 1), (40, 1)];
        let mut free: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..free.len()).rev() {
            free.swap(i, rng.gen_range(0..=i));
        }
        let tables: Vec<Vec<BlockId>> = seqs
            .iter()
            .map(|&(ctx, _)| (0..ctx.div_ceil(bs)).map(|_| BlockId(free.pop().unwrap())).collect())
            .collect();
        let slots: Vec<u32> = seqs
            .iter()
            .zip(&tables)
            .flat_map(|(&(ctx, _), t)| (0..ctx).map(|p| tandem::kv::slot(t, p, bs).unwrap()))
            .collect();
        let n = slots.len();
        let k = rand_vec(rng, n * width, -1.0, 1.0);
        let v = rand_vec(rng, n * width, -1.0, 1.0);
        let rows = 6;
        let q = rand_vec(rng, rows * nh * d, -2.0, 2.0);
        let row_ranges = [0..3, 3..4, 5..6];
        PagedScene { nh, kvh, d, bs, num_blocks, psize, seqs, row_ranges, tables, slots, k, v, q, rows }
    }

    fn width(&self) -> usize {
        self.kvh * self.d
    }

    /// The CPU backend's one-layer cache after writing `k`, `v` at `slots`.
    fn cpu_cache(&self, be: &CpuBackend, k: &[f32], v: &[f32]) -> CpuKvCache {
        let (n, width) = (self.slots.len(), self.width());
        let spec = KvCacheSpec {
            num_layers: 1,
            num_blocks: self.num_blocks,
            block_size: self.bs,
            kv_heads: self.kvh,
            head_dim: self.d,
            dtype: tandem::backend::KvDtype::F32,
        };
        let mut cache = be.alloc_kv(spec).unwrap();
        be.write_kv(&mut cache, 0, &tensor(k, n, width), &tensor(v, n, width), &self.slots).unwrap();
        cache
    }

    /// Runs `kernel` (write_kv or write_kv_bf16: `elem` bytes a value) over
    /// zeroed caches; returns the key and value caches.
    fn emu_write_kv(&self, emu: &Path, kernel: &str, elem: usize) -> (Arg, Arg) {
        let (n, width) = (self.slots.len(), self.width());
        let zeros = vec![0u8; self.num_blocks * self.bs * width * elem];
        let a = [buf!(&self.k), buf!(&self.v), Arg::B(zeros.clone()), Arg::B(zeros), buf!(&self.slots)];
        let mut a: Vec<Arg> = a.into_iter().chain(ints([n, width])).collect();
        launch(emu, kernel, [n as u32, 1, 1], B256, &mut a);
        (take(&mut a[2]), take(&mut a[3]))
    }

    /// The CPU backend's paged attention over `cache`.
    fn cpu_attention(&self, be: &CpuBackend, cache: &CpuKvCache, window: Option<usize>) -> Vec<f32> {
        let metas: Vec<SeqAttention> = self
            .seqs
            .iter()
            .zip(&self.tables)
            .zip(&self.row_ranges)
            .map(|((&(ctx, _), t), r)| SeqAttention { rows: r.clone(), context_len: ctx, block_table: t })
            .collect();
        let (nh, d) = (self.nh, self.d);
        let scale = 1.0 / (d as f32).sqrt();
        let meta = AttentionMeta {
            seqs: &metas,
            num_heads: nh,
            kv_heads: self.kvh,
            head_dim: d,
            scale,
            sliding_window: window,
        };
        let mut want = be.zeros(self.rows, nh * d).unwrap();
        be.paged_attention(cache, 0, &tensor(&self.q, self.rows, nh * d), &meta, &mut want).unwrap();
        std::mem::take(&mut want.data)
    }

    /// `partial` (attention_partial or attention_partial_bf16) over the cache
    /// bytes `kcache`, `vcache`, with one always-empty partition past every
    /// token's keys (checked to say so), then attention_reduce. Returns the
    /// output and the partition count.
    fn emu_attention(
        &self,
        emu: &Path,
        partial: &str,
        kcache: &Arg,
        vcache: &Arg,
        window: Option<usize>,
    ) -> (Vec<f32>, usize) {
        let (rows, nh, d, psize) = (self.rows, self.nh, self.d, self.psize);
        let mut tok_meta = vec![0i32; rows * 3];
        let mut table_off = 0;
        let mut max_parts = 0;
        for ((&(ctx, new), t), r) in self.seqs.iter().zip(&self.tables).zip(&self.row_ranges) {
            for (i, row) in r.clone().enumerate() {
                let c = ctx - new + i + 1;
                let first = window.map_or(0, |w| c.saturating_sub(w));
                tok_meta[row * 3..row * 3 + 3].copy_from_slice(&[first as i32, c as i32, table_off as i32]);
                max_parts = max_parts.max((c - first).div_ceil(psize));
            }
            table_off += t.len();
        }
        let max_parts = max_parts + 1; // one always-empty partition too
        let parts = rows * nh * max_parts;
        let flat_tables: Vec<u32> = self.tables.iter().flatten().map(|b| b.0).collect();
        let scale = 1.0 / (d as f32).sqrt();
        let mut a = vec![
            buf!(&self.q),
            Arg::B(bytes(kcache).to_vec()),
            Arg::B(bytes(vcache).to_vec()),
            buf!(&flat_tables),
            buf!(&tok_meta),
            nan_buf(parts * d),
            nan_buf(parts * 2),
        ];
        a.extend(ints([nh, self.kvh, d, self.bs]));
        a.extend([Arg::F(scale), Arg::I(psize as i32), Arg::I(max_parts as i32)]);
        launch(emu, partial, [rows as u32, nh as u32, max_parts as u32], B128, &mut a);
        // The last partition is past every token's keys: it must say so ({-inf, 0}, zeros).
        let (acc, ml) = (f32s(&a[5]), f32s(&a[6]));
        for row in (max_parts - 1..parts).step_by(max_parts) {
            let empty = ml[2 * row] == f32::NEG_INFINITY && ml[2 * row + 1] == 0.0;
            assert!(empty && acc[row * d..(row + 1) * d].iter().all(|&v| v == 0.0), "{partial}: empty partition {row}");
        }
        let mut r = vec![take(&mut a[5]), take(&mut a[6]), nan_buf(rows * nh * d)];
        r.extend(ints([nh, d, max_parts]));
        launch(emu, "attention_reduce", [rows as u32, nh as u32, 1], B128, &mut r);
        (f32s(&r[2]), max_parts)
    }
}

#[test]
fn attention_write_kv_and_split_k() {
    let Some(emu) = emulator() else { return };
    let be = CpuBackend::new(1).unwrap();
    let s = PagedScene::new(&mut StdRng::seed_from_u64(4));
    let cache = s.cpu_cache(&be, &s.k, &s.v);
    let (kcache, vcache) = s.emu_write_kv(emu, "write_kv", 4);
    exact("write_kv keys", &f32s(&kcache), &cache.k[0]);
    exact("write_kv values", &f32s(&vcache), &cache.v[0]);
    for window in [None, Some(45usize)] {
        let want = s.cpu_attention(&be, &cache, window);
        let (got, parts) = s.emu_attention(emu, "attention_partial", &kcache, &vcache, window);
        let what = format!("paged attention (window {window:?}, {parts} partitions)");
        check(&what, &got, &want, &row_scale(&want, s.d), 1e-5);
    }
}

/// The bf16 cache: write_kv_bf16 stores each value rounded to nearest even,
/// and attention_partial_bf16 over it equals the CPU's attention over an f32
/// cache of those rounded values up to summation order (the f32 test's
/// tolerance), and the unrounded attention within bf16's precision.
#[test]
fn attention_bf16_cache() {
    let Some(emu) = emulator() else { return };
    let be = CpuBackend::new(1).unwrap();
    let mut s = PagedScene::new(&mut StdRng::seed_from_u64(9));
    // Exact rounding ties (to even: down, then up), either sign, and values
    // that round up a binade.
    let ties = [0x3f80_8000u32, 0x3f81_8000, 0xbf80_8000, 0xbf81_8000, 0x3f7f_ffff, 0xbf7f_c000];
    for (i, &b) in ties.iter().enumerate() {
        s.k[i] = f32::from_bits(b);
        s.v[ties.len() - 1 - i] = f32::from_bits(b);
    }
    let exact_cache = s.cpu_cache(&be, &s.k, &s.v);
    let (kcache, vcache) = s.emu_write_kv(emu, "write_kv_bf16", 2);
    for (what, got, want) in [("keys", &kcache, &exact_cache.k[0]), ("values", &vcache, &exact_cache.v[0])] {
        // Unwritten slots are 0 in both.
        let want: Vec<u16> = want.iter().map(|&x| bf16::from_f32(x).to_bits()).collect();
        let got = u16s(got);
        let bad = got.iter().zip(&want).position(|(g, w)| g != w);
        assert!(
            bad.is_none(),
            "write_kv_bf16 {what}[{0}]: got {1:#06x}, want {2:#06x}",
            bad.unwrap(),
            got[bad.unwrap()],
            want[bad.unwrap()]
        );
        println!("write_kv_bf16 {what}: exact");
    }

    let round = |x: &[f32]| x.iter().map(|&x| bf16::from_f32(x).to_f32()).collect::<Vec<f32>>();
    let rounded_cache = s.cpu_cache(&be, &round(&s.k), &round(&s.v));
    for window in [None, Some(45usize)] {
        let (got, parts) = s.emu_attention(emu, "attention_partial_bf16", &kcache, &vcache, window);
        let want = s.cpu_attention(&be, &rounded_cache, window);
        let what = format!("paged attention, bf16 cache (window {window:?}, {parts} partitions)");
        check(&what, &got, &want, &row_scale(&want, s.d), 1e-5);
        let unrounded = s.cpu_attention(&be, &exact_cache, window);
        check(&format!("{what} vs an unrounded f32 cache"), &got, &unrounded, &row_scale(&unrounded, s.d), 1e-2);
    }
}

// ---- lora.cu ----

#[test]
fn lora_bgmv_two_segments() {
    let Some(emu) = emulator() else { return };
    let be = CpuBackend::new(1).unwrap();
    let mut rng = StdRng::seed_from_u64(5);
    let (rows, in_f, out_f) = (5usize, 80usize, 300usize);
    let ranks = [8usize, 4];
    let row_seg = [0i32, 0, -1, 1, 1];
    let max_rank = 8;
    for bf in [false, true] {
        let x = rand_vec(&mut rng, rows * in_f, -1.0, 1.0);
        let base = rand_vec(&mut rng, rows * out_f, -1.0, 1.0);
        let mut mats = vec![];
        let mut a_bytes = vec![];
        let mut bt_bytes = vec![];
        for &rank in &ranks {
            let a = rand_vec(&mut rng, rank * in_f, -0.5, 0.5);
            let bt = rand_vec(&mut rng, rank * out_f, -0.5, 0.5);
            let (values, raw): (Vec<LoraValues>, Vec<Vec<u8>>) = [a, bt]
                .into_iter()
                .map(|v| {
                    if bf {
                        let h: Vec<bf16> = v.into_iter().map(bf16::from_f32).collect();
                        let raw = h.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
                        (LoraValues::Bf16(h), raw)
                    } else {
                        let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                        (LoraValues::F32(v), raw)
                    }
                })
                .unzip();
            let [a, bt]: [LoraValues; 2] = values.try_into().ok().unwrap();
            a_bytes.push(raw[0].clone());
            bt_bytes.push(raw[1].clone());
            let m = LoraMatrix { rank, in_features: in_f, out_features: out_f, a, bt };
            mats.push(be.load_lora(&Arc::new(m)).unwrap());
        }
        let segs = [LoraSegment { rows: 0..2, w: &mats[0] }, LoraSegment { rows: 3..5, w: &mats[1] }];
        let mut want = tensor(&base, rows, out_f);
        be.lora_add(&tensor(&x, rows, in_f), &segs, &mut want).unwrap();

        let sfx = if bf { "bf16" } else { "f32" };
        let rank_buf = buf!(&ranks.map(|r| r as i32));
        // b: indices: x 0, row_seg 1, seg_rank 2, t 3, then the matrices 4, 5.
        let mut s = vec![buf!(&x), buf!(&row_seg), Arg::A(vec![4, 5]), Arg::B(bytes(&rank_buf).to_vec())];
        s.extend([nan_buf(rows * max_rank), Arg::I(rows as i32), Arg::I(in_f as i32), Arg::I(max_rank as i32)]);
        s.extend(a_bytes.into_iter().map(Arg::B));
        launch(emu, &format!("lora_shrink_{sfx}"), [rows as u32, max_rank as u32, 1], B128, &mut s);
        let t = f32s(&s[4]);
        for (r, &seg) in row_seg.iter().enumerate() {
            let rank = if seg < 0 { 0 } else { ranks[seg as usize] };
            assert!(
                t[r * max_rank + rank..(r + 1) * max_rank].iter().all(|&v| v == 0.0),
                "lora_shrink_{sfx}: row {r} pad"
            );
        }

        let mut e = vec![buf!(&t), buf!(&row_seg), Arg::A(vec![4, 5]), rank_buf, buf!(&base)];
        e.extend([Arg::I(rows as i32), Arg::I(out_f as i32), Arg::I(max_rank as i32)]);
        e.extend(bt_bytes.into_iter().map(Arg::B));
        launch(emu, &format!("lora_expand_{sfx}"), [rows as u32, out_f.div_ceil(256) as u32, 1], B256, &mut e);
        let got = f32s(&e[4]);
        exact(&format!("lora {sfx}: untouched row"), &got[2 * out_f..3 * out_f], &base[2 * out_f..3 * out_f]);
        check(&format!("lora {sfx}"), &got, &want.data, &row_scale(&want.data, out_f), 2e-6);
    }
}

// ---- quant.cu ----

const KINDS: [(WeightKind, &str, usize); 14] = [
    (WeightKind::F32, "f32", 80),
    (WeightKind::F16, "f16", 80),
    (WeightKind::BF16, "bf16", 80),
    (WeightKind::Q4_0, "q4_0", 160),
    (WeightKind::Q5_0, "q5_0", 160),
    (WeightKind::Q8_0, "q8_0", 160),
    (WeightKind::Q4K, "q4_k", 768),
    (WeightKind::Q5K, "q5_k", 768),
    (WeightKind::Q6K, "q6_k", 768),
    (WeightKind::Nf4, "nf4", 320),
    (WeightKind::Fp4, "fp4", 320),
    // 3 groups of 128, 6 of 64, 12 of 32: every kind's warps end part-way
    // through a pass over the row's blocks.
    (WeightKind::Int4G128, "int4g128", 384),
    (WeightKind::Int4G64, "int4g64", 384),
    (WeightKind::Int4G32, "int4g32", 384),
];
const QROWS: usize = 9;

/// Random blocks of `kind`: random quants, finite f16 scales of either sign.
fn random_weight(rng: &mut StdRng, kind: WeightKind, rows: usize, cols: usize) -> Vec<u8> {
    random_weight_bytes(kind, rows, cols, 1.0, &mut tandem::quant::random::Rng::new(rng.gen()))
}

#[test]
fn quant_gemv_every_kind() {
    let Some(emu) = emulator() else { return };
    let be = CpuBackend::new(1).unwrap();
    let mut rng = StdRng::seed_from_u64(6);
    for (kind, name, cols) in KINDS {
        let wb = random_weight(&mut rng, kind, QROWS, cols);
        let mut wf = vec![0f32; QROWS * cols];
        dequantize(kind, &wb, &mut wf).unwrap();
        let w = weight(&be, kind, QROWS, cols, wb.clone());
        for batch in [1usize, 5] {
            let x = rand_vec(&mut rng, batch * cols, -1.0, 1.0);
            let bias = (batch > 1).then(|| rand_vec(&mut rng, QROWS, -1.0, 1.0));
            let bias_w = bias.as_ref().map(|b| f32_weight(&be, b, 1, QROWS));
            let mut want = be.zeros(batch, QROWS).unwrap();
            be.matmul_many(&tensor(&x, batch, cols), &mut [MatmulJob { w: &w, bias: bias_w.as_ref(), out: &mut want }])
                .unwrap();
            // Scale of each output: Σ|x·w| (+|bias|), what rounding errors grow with.
            let scale: Vec<f32> = (0..batch * QROWS)
                .map(|i| {
                    let (b, r) = (i / QROWS, i % QROWS);
                    let s: f32 = (0..cols).map(|k| (x[b * cols + k] * wf[r * cols + k]).abs()).sum();
                    s + bias.as_ref().map_or(0.0, |bv| bv[r].abs())
                })
                .collect();
            let mut a = vec![Arg::B(wb.clone()), buf!(&x), bias.as_ref().map_or(Arg::Null, |b| buf!(b))];
            a.push(nan_buf(batch * QROWS));
            a.extend(ints([QROWS, cols, kind.row_bytes(cols).unwrap(), batch]));
            launch(emu, &format!("gemv_{name}"), [QROWS.div_ceil(4) as u32, 1, 1], B128, &mut a);
            check(&format!("gemv_{name} batch {batch}"), &f32s(&a[3]), &want.data, &scale, 2e-6);
        }
    }
}

#[test]
fn quant_dequant_every_kind() {
    let Some(emu) = emulator() else { return };
    let be = CpuBackend::new(1).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    for (kind, name, cols) in KINDS {
        let wb = random_weight(&mut rng, kind, QROWS, cols);
        let row_bytes = kind.row_bytes(cols).unwrap() as i32;
        let mut wf = vec![0f32; QROWS * cols];
        dequantize(kind, &wb, &mut wf).unwrap();

        let out = Arg::B(vec![0xFF; 2 * QROWS * cols]);
        let mut a = [Arg::B(wb.clone()), out, Arg::I(QROWS as i32), Arg::I(cols as i32), Arg::I(row_bytes)];
        launch(emu, &format!("dequant_bf16_{name}"), [QROWS as u32, 1, 1], B256, &mut a);
        let want: Vec<u16> = wf.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let got = u16s(&a[1]);
        let bad = got.iter().zip(&want).position(|(g, w)| g != w);
        assert!(
            bad.is_none(),
            "dequant_bf16_{name}[{}]: got {:#06x}, want {:#06x}",
            bad.unwrap(),
            got[bad.unwrap()],
            want[bad.unwrap()]
        );
        println!("dequant_bf16_{name}: exact");

        // Id 1000 is past the table: the last row, as the CPU's embedding does.
        let ids = [8u32, 0, 3, 1000, 3];
        let w = weight(&be, kind, QROWS, cols, wb.clone());
        let mut emb = be.zeros(ids.len(), cols).unwrap();
        be.embedding(&w, &ids, &mut emb).unwrap();
        let direct: Vec<f32> =
            ids.iter().flat_map(|&i| wf[(i as usize).min(QROWS - 1) * cols..][..cols].to_vec()).collect();
        exact(&format!("embedding reference {name}"), &emb.data, &direct);
        let mut a = vec![Arg::B(wb), buf!(&ids), nan_buf(ids.len() * cols)];
        a.extend(ints([ids.len(), cols, row_bytes as usize, QROWS]));
        launch(emu, &format!("dequant_rows_{name}"), [ids.len() as u32, 1, 1], B256, &mut a);
        exact(&format!("dequant_rows_{name}"), &f32s(&a[2]), &direct);
    }
}

// ---- train.cu, and quant.cu's mmq (after the helpers above: macros are in scope only below them) ----

#[path = "cuda_kernels_emu/train.rs"]
mod train;

#[path = "cuda_kernels_emu/mmq.rs"]
mod mmq;
