//! Every GPU op against its CPU twin (DESIGN.md's terms): fresh random inputs, never zeros; odd
//! sizes (T = 17, 50, 197; r = 1, 4, 8, 16; M = 1, 3, 16); outputs poisoned with NaN first (test
//! builds poison every `Tensor::empty`), so an unwritten element fails; and the relative error
//! ‖gpu − cpu‖/‖cpu‖ under 1e-2 for bf16 outputs and 1e-5 for f32 ones.
//!
//! Inputs are rounded to bf16 before both sides see them, so the comparison measures the
//! kernels, not the rounding of their inputs. With no usable GPU every test says so and passes.

use loren_tensor::ops::dropkey::{DropKey, ItemKeys};
use loren_tensor::ops::{
    activation, attention, elementwise, embed, linear, lora, loss, norm, optim,
};
use loren_tensor::{DType, Device, MemTag, Rng, Staged, Tensor};

const BF16_BOUND: f64 = 1e-2;
const F32_BOUND: f64 = 1e-5;

fn gpu() -> Option<Device> {
    match loren_kernels::cuda_available() {
        Ok(()) => Some(Device::cuda(0).expect("a usable GPU opens")),
        Err(e) => {
            loren_kernels::skip_without_gpu(format!("no CUDA device ({e})"));
            None
        }
    }
}

/// This test's CPU device: CPU ops take their operands from one device (each `Device::cpu()` has
/// its own accounting), and every test runs on a thread of its own.
fn cpu() -> Device {
    thread_local! {
        static CPU: Device = Device::cpu();
    }
    CPU.with(Device::clone)
}

/// The same random values on the CPU and the GPU, rounded to bf16 so both see exactly them.
/// `dtype` is how the GPU stores it.
fn pair(shape: &[usize], dtype: DType, rng: &mut Rng, gpu: &Device) -> (Tensor, Tensor) {
    let cpu = cpu();
    let data: Vec<f32> = (0..shape.iter().product())
        .map(|_| half::bf16::from_f32(rng.normal()).to_f32())
        .collect();
    let c = Tensor::from_vec(data.clone(), shape.to_vec(), MemTag::Workspace, &cpu).unwrap();
    let g = Tensor::from_vec_as(data, shape.to_vec(), dtype, MemTag::Workspace, gpu).unwrap();
    (c, g)
}

fn rel_err(gpu: &Tensor, cpu: &Tensor) -> f64 {
    assert_eq!(gpu.dims(), cpu.dims(), "shapes differ");
    let (g, c) = (gpu.to_vec().unwrap(), cpu.to_vec().unwrap());
    let diff: f64 = g
        .iter()
        .zip(&c)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let norm: f64 = c.iter().map(|b| (*b as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

/// The bound for a result stored as `t` is: bf16 or f32.
fn bound_for(t: &Tensor) -> f64 {
    if t.dtype() == DType::BF16 {
        BF16_BOUND
    } else {
        F32_BOUND
    }
}

/// The GPU result must match the CPU's within the bound for its dtype (NaN fails).
fn close(what: &str, gpu: &Tensor, cpu: &Tensor) {
    let bound = bound_for(gpu);
    let e = rel_err(gpu, cpu);
    println!(
        "{what:<48} {:<5} relative error {e:.3e} (bound {bound:.0e})",
        gpu.dtype().name()
    );
    assert!(e < bound, "{what}: relative error {e:e} (bound {bound:e})");
}

fn rms(t: &Tensor) -> f64 {
    let v = t.to_vec().unwrap();
    (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

/// A result that is exactly zero: its root mean square must be under the bound for its dtype,
/// relative to that of `scale`, a result of the same computation that is not zero (NaN fails).
fn near_zero(what: &str, gpu: &Tensor, scale: &Tensor) {
    let bound = bound_for(gpu);
    let e = rms(gpu) / rms(scale).max(1e-30);
    println!(
        "{what:<48} {:<5} rms {e:.3e} of the reference's (exact 0, bound {bound:.0e})",
        gpu.dtype().name()
    );
    assert!(
        e < bound,
        "{what}: rms {e:e} of the reference's (bound {bound:e})"
    );
}

#[test]
fn linear_shared_member_and_broadcast_weights() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(1);
    let bf = DType::BF16;
    // (x groups, w groups, rows per group dims, k, n)
    for &(gx, gw, t, k, n) in &[
        (3, 1, 17, 64, 48),
        (3, 3, 50, 40, 24),
        (1, 3, 17, 32, 16),
        (1, 1, 197, 72, 40),
    ] {
        let (xc, xg) = pair(&[gx, 2, t, k], bf, &mut rng, &g);
        let (wc, wg) = pair(&[gw, n, k], bf, &mut rng, &g);
        let (bc, bg) = pair(&[gw, n], DType::F32, &mut rng, &g);
        let tag = format!("linear gx={gx} gw={gw} T={t} {k}->{n}");
        for out in [bf, DType::F32] {
            let yc = linear::linear_forward(&xc, &wc, Some(&bc), DType::F32, None).unwrap();
            let yg = linear::linear_forward(&xg, &wg, Some(&bg), out, None).unwrap();
            close(&format!("{tag} forward"), &yg, &yc);
        }
        let groups = gx.max(gw);
        // Joined to a residual stream (shared, then one per group) in the product, with and
        // without the bias.
        for rg in [1, groups] {
            let (rc, rgpu) = pair(&[rg, 2, t, n], bf, &mut rng, &g);
            for bias in [true, false] {
                let (b_c, b_g) = (bias.then_some(&bc), bias.then_some(&bg));
                let yc = linear::linear_forward(&xc, &wc, b_c, DType::F32, Some(&rc)).unwrap();
                let yg = linear::linear_forward(&xg, &wg, b_g, bf, Some(&rgpu)).unwrap();
                close(&format!("{tag} + residual[{rg}] bias {bias}"), &yg, &yc);
            }
        }
        let (dyc, dyg) = pair(&[groups, 2, t, n], bf, &mut rng, &g);
        let needs = linear::Needs {
            dx: true,
            dw: true,
            db: true,
        };
        let c = linear::linear_backward(&dyc, xc.shape(), Some(&xc), &wc, true, needs, None);
        let gg = linear::linear_backward(&dyg, xg.shape(), Some(&xg), &wg, true, needs, None);
        let (c, gg) = (c.unwrap(), gg.unwrap());
        close(
            &format!("{tag} dx"),
            gg.dx.as_ref().unwrap(),
            c.dx.as_ref().unwrap(),
        );
        // With a gradient x already has: accumulated in the GEMM, or added after it for a
        // shared input.
        let (pc, pg) = pair(xc.dims(), bf, &mut rng, &g);
        let only_dx = linear::Needs {
            dx: true,
            dw: false,
            db: false,
        };
        let cp = linear::linear_backward(&dyc, xc.shape(), None, &wc, true, only_dx, Some(pc));
        let gp = linear::linear_backward(&dyg, xg.shape(), None, &wg, true, only_dx, Some(pg));
        close(
            &format!("{tag} dx + dx_plus"),
            gp.unwrap().dx.as_ref().unwrap(),
            cp.unwrap().dx.as_ref().unwrap(),
        );
        close(
            &format!("{tag} dW"),
            gg.dw.as_ref().unwrap(),
            c.dw.as_ref().unwrap(),
        );
        close(
            &format!("{tag} db"),
            gg.db.as_ref().unwrap(),
            c.db.as_ref().unwrap(),
        );
    }
}

#[test]
fn lora_linear_every_rank_member_count_and_prefix() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(2);
    let bf = DType::BF16;
    for (i, &(m, prefix, t, r, k, n)) in [
        (3, false, 17, 1, 64, 64),
        (3, true, 17, 4, 64, 64),
        (16, false, 50, 8, 96, 80),
        (16, true, 50, 16, 96, 80),
        (1, false, 197, 4, 64, 192),
        (3, false, 197, 16, 72, 40),
    ]
    .iter()
    .enumerate()
    {
        let gx = if prefix { 1 } else { m };
        let (xc, xg) = pair(&[gx, 2, t, k], bf, &mut rng, &g);
        let (wc, wg) = pair(&[1, n, k], bf, &mut rng, &g);
        let (bc, bg) = pair(&[1, n], DType::F32, &mut rng, &g);
        let (ac, ag) = pair(&[m, r, k], DType::F32, &mut rng, &g);
        let (b2c, b2g) = pair(&[m, n, r], DType::F32, &mut rng, &g);
        let tag = format!("lora M={m} prefix={prefix} T={t} r={r} {k}->{n}");
        // A residual joined in the store: none, shared by the members, one each, in turn.
        let rg = [0, 1, m][i % 3];
        let (rc, rgpu) = pair(&[rg.max(1), 2, t, n], bf, &mut rng, &g);
        let (rc, rgpu) = if rg > 0 {
            (Some(&rc), Some(&rgpu))
        } else {
            (None, None)
        };
        let fc = lora::lora_forward(&xc, &wc, Some(&bc), &ac, &b2c, 0.7, rc).unwrap();
        let fg = lora::lora_forward(&xg, &wg, Some(&bg), &ag, &b2g, 0.7, rgpu).unwrap();
        let tag = format!("{tag} residual groups {rg}");
        close(&format!("{tag} y"), &fg.y, &fc.y);
        close(&format!("{tag} u"), &fg.u, &fc.u);
        let (dyc, dyg) = pair(&[m, 2, t, n], bf, &mut rng, &g);
        // Every other case joins dx to a gradient x already had (shared and member inputs).
        let (pc, pg) = pair(&[gx, 2, t, k], bf, &mut rng, &g);
        let (pc, pg) = if i % 2 == 1 {
            (Some(&pc), Some(&pg))
        } else {
            (None, None)
        };
        let (fcu, fgu) = (&fc.u, &fg.u);
        let c = lora::lora_backward(&dyc, &xc, &wc, &ac, &b2c, fcu, 0.7, true, true, pc).unwrap();
        let gg = lora::lora_backward(&dyg, &xg, &wg, &ag, &b2g, fgu, 0.7, true, true, pg).unwrap();
        let tag = format!("{tag} dx_plus={}", pc.is_some());
        close(
            &format!("{tag} dx"),
            gg.dx.as_ref().unwrap(),
            c.dx.as_ref().unwrap(),
        );
        close(
            &format!("{tag} dA"),
            gg.da.as_ref().unwrap(),
            c.da.as_ref().unwrap(),
        );
        close(
            &format!("{tag} dB"),
            gg.db.as_ref().unwrap(),
            c.db.as_ref().unwrap(),
        );
    }
}

/// LSE of rows with every key dropped is −∞ on both sides, in the same places; the rest as
/// [`close`].
fn close_lse(what: &str, on_gpu: &Tensor, on_cpu: &Tensor) {
    let (g, c) = (on_gpu.to_vec().unwrap(), on_cpu.to_vec().unwrap());
    let gone = |v: &[f32]| -> Vec<usize> {
        (0..v.len())
            .filter(|&i| v[i] == f32::NEG_INFINITY)
            .collect()
    };
    let rows = gone(&c);
    assert_eq!(gone(&g), rows, "{what}: rows with every key dropped");
    let finite = |v: &[f32]| -> Tensor {
        let kept: Vec<f32> = v.iter().copied().filter(|x| x.is_finite()).collect();
        let n = kept.len();
        Tensor::from_vec(kept, [n], MemTag::Workspace, &cpu()).unwrap()
    };
    if !rows.is_empty() {
        println!("{what:<48} {} rows with every key dropped", rows.len());
    }
    close(what, &finite(&g), &finite(&c));
}

#[test]
fn attention_every_length_head_dim_and_broadcast() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(3);
    let bf = DType::BF16;
    // (G, q, k, v groups, B, T, heads, head dim, DropKey rate). With a rate, G members draw
    // masks of their own, from shared inputs too; 0.7 on 5 tokens leaves a fifth of the rows (12
    // of 60) with every key dropped, and 0.97 on 130 tokens leaves whole 64-key tiles dropped
    // beside kept ones. Head dim 128 with a rate runs the dK/dV kernel that takes its query
    // tiles in two parts, over two tiles and a ragged third.
    for &(gr, gq, gk, gv, b, t, h, dh, rate) in &[
        (3, 3, 3, 3, 2, 17, 4, 16, None),
        (3, 3, 1, 1, 2, 17, 4, 16, None),
        (16, 16, 16, 16, 1, 50, 2, 32, None),
        (1, 1, 1, 1, 2, 197, 2, 64, None),
        (3, 3, 3, 1, 1, 50, 1, 128, None),
        (1, 1, 1, 1, 1, 1, 2, 64, None),
        (3, 1, 1, 1, 2, 17, 4, 16, Some(0.2)),
        (2, 2, 2, 2, 1, 197, 2, 64, Some(0.2)),
        (3, 1, 1, 1, 2, 5, 2, 32, Some(0.7)),
        (2, 1, 1, 1, 1, 130, 1, 16, Some(0.97)),
        (2, 2, 1, 2, 2, 150, 1, 128, Some(0.3)),
    ] {
        let (qc, qg) = pair(&[gq, b, t, h * dh], bf, &mut rng, &g);
        let (kc, kg) = pair(&[gk, b, t, h * dh], bf, &mut rng, &g);
        let (vc, vg) = pair(&[gv, b, t, h * dh], bf, &mut rng, &g);
        // Two-row batches draw by item keys of all 64 bits, as a prediction's images do; the
        // others by row, as a training step does. Each side's keys live on its own device.
        let keys: Vec<u64> = (0..b as u64)
            .map(|i| ((t as u64) << 33) ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        let drop_on = |dev: &Device| {
            rate.map(|r| {
                let dk = DropKey::new(r, 0xD20 + t as u64, gr).unwrap();
                match b {
                    2 => dk.with_items(ItemKeys::new(keys.clone(), dev).unwrap()),
                    _ => dk,
                }
            })
        };
        let (drop_c, drop_g) = (drop_on(&cpu()), drop_on(&g));
        let tag = format!(
            "attention G={gr} q{gq} k{gk} v{gv} B={b} T={t} H={h} dh={dh} drop {}",
            rate.unwrap_or(0.0)
        );
        let fc = attention::attention_forward(&qc, &kc, &vc, h, drop_c.as_ref()).unwrap();
        let fg = attention::attention_forward(&qg, &kg, &vg, h, drop_g.as_ref()).unwrap();
        close(&format!("{tag} O"), &fg.o, &fc.o);
        close_lse(&format!("{tag} LSE"), &fg.lse, &fc.lse);
        let (doc, dog) = pair(&[gr, b, t, h * dh], bf, &mut rng, &g);
        // The backward of both reads the GPU's O (rounded to bf16), so Δ agrees.
        let o_cpu = Tensor::from_vec(
            fg.o.to_vec().unwrap(),
            fg.o.dims().to_vec(),
            MemTag::Workspace,
            &cpu(),
        )
        .unwrap();
        let c =
            attention::attention_backward(&doc, &qc, &kc, &vc, &o_cpu, &fc.lse, h, drop_c.as_ref())
                .unwrap();
        let gg =
            attention::attention_backward(&dog, &qg, &kg, &vg, &fg.o, &fg.lse, h, drop_g.as_ref())
                .unwrap();
        let (dq, dk, dv) = (
            gg.dq.as_ref().unwrap(),
            gg.dk.as_ref().unwrap(),
            gg.dv.as_ref().unwrap(),
        );
        if t == 1 {
            // One key: P = 1 whatever the scores, so dQ and dK are exactly zero and both sides
            // hold only rounding; measure that against the gradient that is not zero.
            near_zero(&format!("{tag} dQ"), dq, dv);
            near_zero(&format!("{tag} dK"), dk, dv);
        } else {
            close(&format!("{tag} dQ"), dq, c.dq.as_ref().unwrap());
            close(&format!("{tag} dK"), dk, c.dk.as_ref().unwrap());
        }
        close(&format!("{tag} dV"), dv, c.dv.as_ref().unwrap());
    }
}

#[test]
fn layernorm_shared_and_member_affine() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(4);
    for &(gx, gw, t, d) in &[
        (3, 1, 17, 64),
        (1, 3, 50, 96),
        (16, 16, 17, 64),
        (1, 1, 197, 768),
    ] {
        let (xc, xg) = pair(&[gx, 2, t, d], DType::BF16, &mut rng, &g);
        let (gc, gg) = pair(&[gw, d], DType::F32, &mut rng, &g);
        let (bc, bg) = pair(&[gw, d], DType::F32, &mut rng, &g);
        let tag = format!("layernorm gx={gx} gw={gw} T={t} D={d}");
        let fc = norm::layernorm_forward(&xc, &gc, &bc, 1e-6).unwrap();
        let fg = norm::layernorm_forward(&xg, &gg, &bg, 1e-6).unwrap();
        close(&format!("{tag} y"), &fg.y, &fc.y);
        close(&format!("{tag} mean"), &fg.mean, &fc.mean);
        close(&format!("{tag} rstd"), &fg.rstd, &fc.rstd);
        let (dyc, dyg) = pair(&[gx.max(gw), 2, t, d], DType::BF16, &mut rng, &g);
        let (pc, pg) = pair(&[gx, 2, t, d], DType::BF16, &mut rng, &g);
        let (fcm, fcr, fgm, fgr) = (&fc.mean, &fc.rstd, &fg.mean, &fg.rstd);
        let c = norm::layernorm_backward(&dyc, &xc, &gc, &bc, fcm, fcr, true, true, None).unwrap();
        let k = norm::layernorm_backward(&dyg, &xg, &gg, &bg, fgm, fgr, true, true, None).unwrap();
        close(
            &format!("{tag} dx"),
            k.dx.as_ref().unwrap(),
            c.dx.as_ref().unwrap(),
        );
        let with = |dy, x, g, b, m, r, p| {
            norm::layernorm_backward(dy, x, g, b, m, r, true, false, Some(p))
                .unwrap()
                .dx
                .unwrap()
        };
        close(
            &format!("{tag} dx + dx_plus"),
            &with(&dyg, &xg, &gg, &bg, fgm, fgr, &pg),
            &with(&dyc, &xc, &gc, &bc, fcm, fcr, &pc),
        );
        close(
            &format!("{tag} dgamma"),
            k.dgamma.as_ref().unwrap(),
            c.dgamma.as_ref().unwrap(),
        );
        close(
            &format!("{tag} dbeta"),
            k.dbeta.as_ref().unwrap(),
            c.dbeta.as_ref().unwrap(),
        );
    }
}

#[test]
fn bias_gelu_forward_and_backward() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(5);
    for &(gx, gb, t, n) in &[(3, 1, 17, 128), (1, 3, 50, 72), (16, 16, 197, 40)] {
        let (xc, xg) = pair(&[gx, 2, t, n], DType::BF16, &mut rng, &g);
        let (bc, bg) = pair(&[gb, n], DType::F32, &mut rng, &g);
        let tag = format!("bias_gelu gx={gx} gb={gb} T={t} N={n}");
        close(
            &format!("{tag} y"),
            &activation::bias_gelu_forward(&xg, &bg).unwrap(),
            &activation::bias_gelu_forward(&xc, &bc).unwrap(),
        );
        let (dyc, dyg) = pair(&[gx.max(gb), 2, t, n], DType::BF16, &mut rng, &g);
        let c = activation::bias_gelu_backward(&dyc, &xc, &bc, true, true).unwrap();
        let k = activation::bias_gelu_backward(&dyg, &xg, &bg, true, true).unwrap();
        close(
            &format!("{tag} dx"),
            k.dx.as_ref().unwrap(),
            c.dx.as_ref().unwrap(),
        );
        close(
            &format!("{tag} db"),
            k.db.as_ref().unwrap(),
            c.db.as_ref().unwrap(),
        );
    }
}

#[test]
fn patch_and_token_embedding_and_class_token() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(6);
    for &(b, c, hw, p) in &[(3, 1, 8, 2), (2, 3, 32, 16), (1, 3, 64, 32)] {
        let (ic, ig) = pair(&[b, c, hw, hw], DType::F32, &mut rng, &g);
        close(
            &format!("patchify B={b} C={c} {hw}x{hw} p={p}"),
            &embed::patchify(&ig, p).unwrap(),
            &embed::patchify(&ic, p).unwrap(),
        );
        // Staged as a GPU batch is (rounded to bf16 on the host): the same patches, bit for bit,
        // as from f32 images rounded on the device.
        let raw: Vec<f32> = (0..b * c * hw * hw).map(|_| rng.normal()).collect();
        let shape = [b, c, hw, hw];
        let f32_images = Tensor::from_slice(&raw, shape, MemTag::Workspace, &g).unwrap();
        let staged = Staged::new_as(&raw, shape, DType::BF16, &g).unwrap();
        let bf16_images = Tensor::from_staged(staged, MemTag::Workspace).unwrap();
        assert_eq!(bf16_images.dtype(), DType::BF16);
        assert_eq!(
            embed::patchify(&bf16_images, p).unwrap().to_vec().unwrap(),
            embed::patchify(&f32_images, p).unwrap().to_vec().unwrap(),
            "patchify of bf16-staged images B={b} C={c} {hw}x{hw} p={p}"
        );
    }
    for &(ge, gc, gp, b, patches, d) in &[
        (1, 1, 1, 3, 16, 64),
        (3, 1, 3, 2, 49, 32),
        (3, 3, 1, 1, 196, 16),
    ] {
        let groups = ge.max(gc).max(gp);
        let (pec, peg) = pair(&[ge, b, patches, d], DType::BF16, &mut rng, &g);
        let (cc, cg) = pair(&[gc, d], DType::F32, &mut rng, &g);
        let (pc, pg) = pair(&[gp, patches + 1, d], DType::F32, &mut rng, &g);
        let tag = format!("embed_tokens ge={ge} gc={gc} gp={gp} B={b} P={patches} D={d}");
        let xc = embed::embed_tokens_forward(&pec, &cc, &pc).unwrap();
        let xg = embed::embed_tokens_forward(&peg, &cg, &pg).unwrap();
        close(&format!("{tag} x"), &xg, &xc);
        let (dxc, dxg) = pair(&[groups, b, patches + 1, d], DType::BF16, &mut rng, &g);
        let c = embed::embed_tokens_backward(&dxc, &pec, &cc, &pc, [true; 3]).unwrap();
        let k = embed::embed_tokens_backward(&dxg, &peg, &cg, &pg, [true; 3]).unwrap();
        close(
            &format!("{tag} dpe"),
            k.dpe.as_ref().unwrap(),
            c.dpe.as_ref().unwrap(),
        );
        close(
            &format!("{tag} dcls"),
            k.dcls.as_ref().unwrap(),
            c.dcls.as_ref().unwrap(),
        );
        close(
            &format!("{tag} dpos"),
            k.dpos.as_ref().unwrap(),
            c.dpos.as_ref().unwrap(),
        );
        close(
            &format!("class_token G={groups} B={b} T={}", patches + 1),
            &embed::class_token_forward(&xg).unwrap(),
            &embed::class_token_forward(&xc).unwrap(),
        );
        let (dyc, dyg) = pair(&[groups, b, d], DType::BF16, &mut rng, &g);
        close(
            &format!("class_token backward G={groups} B={b}"),
            &embed::class_token_backward(&dyg, patches + 1).unwrap(),
            &embed::class_token_backward(&dyc, patches + 1).unwrap(),
        );
    }
}

#[test]
fn cross_entropy_and_softmax() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(7);
    for &(m, b, c) in &[(1, 32, 10), (3, 17, 10), (16, 32, 100)] {
        let (lc, lg) = pair(&[m, b, c], DType::F32, &mut rng, &g);
        let targets: Vec<u32> = (0..b).map(|_| rng.below(c) as u32).collect();
        let oc = loss::softmax_cross_entropy(&lc, &targets).unwrap();
        let og = loss::softmax_cross_entropy(&lg, &targets).unwrap();
        let tag = format!("cross entropy M={m} B={b} C={c}");
        close(&format!("{tag} loss"), &og.loss, &oc.loss);
        close(&format!("{tag} dlogits"), &og.dlogits, &oc.dlogits);
        close(
            &format!("softmax M={m} B={b} C={c}"),
            &loss::softmax(&lg).unwrap(),
            &loss::softmax(&lc).unwrap(),
        );
    }
}

#[test]
fn elementwise_adds_and_reductions() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(8);
    for dtype in [DType::BF16, DType::F32] {
        let (ac, ag) = pair(&[1, 2, 17, 64], dtype, &mut rng, &g);
        let (bc, bg) = pair(&[3, 2, 17, 64], dtype, &mut rng, &g);
        let tag = dtype.name();
        close(
            &format!("add broadcast {tag}"),
            &elementwise::add(&ag, &bg).unwrap(),
            &elementwise::add(&ac, &bc).unwrap(),
        );
        close(
            &format!("sum_groups {tag}"),
            &elementwise::sum_groups(&bg).unwrap(),
            &elementwise::sum_groups(&bc).unwrap(),
        );
        let (mut dc, mut dg) = pair(&[3, 2, 17, 64], dtype, &mut rng, &g);
        elementwise::add_assign(&mut dc, &bc).unwrap();
        elementwise::add_assign(&mut dg, &bg).unwrap();
        elementwise::scale_(&mut dc, 0.37).unwrap();
        elementwise::scale_(&mut dg, 0.37).unwrap();
        close(&format!("add_assign then scale {tag}"), &dg, &dc);
    }
    let (xc, xg) = pair(&[5, 1000], DType::F32, &mut rng, &g);
    let (sc, sg) = (
        elementwise::sum_squares(&xc).unwrap(),
        elementwise::sum_squares(&xg).unwrap(),
    );
    let e = (sg - sc).abs() / sc;
    println!("sum of squares relative error {e:.3e}");
    assert!(e < F32_BOUND, "sum of squares: {sg} vs {sc}");
}

#[test]
fn fused_adamw_with_clipping_matches_the_cpu() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(9);
    let shapes: [&[usize]; 3] = [&[3, 64, 8], &[3, 10], &[70000]];
    let h = optim::AdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 3,
    };
    let mut cpu_t: Vec<[Tensor; 4]> = Vec::new();
    let mut gpu_t: Vec<[Tensor; 4]> = Vec::new();
    for s in shapes {
        // Parameter, gradient, first and second moment (the last positive).
        let values = |scale: f32, rng: &mut Rng| -> Vec<f32> {
            (0..s.iter().product())
                .map(|_| scale * rng.normal().abs())
                .collect()
        };
        let host: [Vec<f32>; 4] = [
            values(1.0, &mut rng),
            values(3.0, &mut rng),
            values(0.1, &mut rng),
            values(0.01, &mut rng),
        ];
        let on = |dev: &Device| {
            host.clone()
                .map(|v| Tensor::from_vec(v, s.to_vec(), MemTag::Workspace, dev).unwrap())
        };
        cpu_t.push(on(&cpu()));
        gpu_t.push(on(&g));
    }
    // CPU: clip in place, then the step.
    let max_norm = 1.0;
    let norm: f64 = cpu_t
        .iter()
        .map(|t| elementwise::sum_squares(&t[1]).unwrap())
        .sum::<f64>()
        .sqrt();
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    assert!(coef < 1.0, "the test must exercise clipping");
    for t in cpu_t.iter_mut() {
        elementwise::scale_(&mut t[1], coef as f32).unwrap();
    }
    let mut slots: Vec<optim::Slot> = Vec::new();
    for t in cpu_t.iter_mut() {
        let [p, gr, m, v] = t;
        slots.push(optim::Slot {
            param: p,
            grad: gr,
            m,
            v: Some(v),
            decay: true,
        });
    }
    optim::adamw_step(&mut slots, &h).unwrap();
    // GPU: one table, the norm and the update on the device.
    let mut shadows: Vec<Tensor> = gpu_t
        .iter()
        .map(|t| t[0].copy_as(DType::BF16, MemTag::Trainable).unwrap())
        .collect();
    let mut gslots: Vec<optim::GpuSlot> = Vec::new();
    for (t, sh) in gpu_t.iter_mut().zip(shadows.iter_mut()) {
        let [p, gr, m, v] = t;
        gslots.push(optim::GpuSlot {
            param: p,
            grad: gr,
            m,
            v: Some(v),
            shadow: Some(sh),
            decay: true,
        });
    }
    let mut table = optim::FusedTable::refresh(None, &g, &mut gslots).unwrap();
    table.step_adamw(&g, &h, Some(max_norm), None).unwrap();
    drop(gslots);
    for (i, (c, k)) in cpu_t.iter().zip(&gpu_t).enumerate() {
        close(&format!("adamw tensor {i} param"), &k[0], &c[0]);
        close(&format!("adamw tensor {i} m"), &k[2], &c[2]);
        close(&format!("adamw tensor {i} v"), &k[3], &c[3]);
        close(&format!("adamw tensor {i} bf16 shadow"), &shadows[i], &c[0]);
    }
}

/// `Device::time` reads CUDA events around the work: ten products take several times one.
#[test]
fn the_event_timer_measures_the_enqueued_work() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(11);
    let (_, x) = pair(&[1, 1024, 1024], DType::BF16, &mut rng, &g);
    let (_, w) = pair(&[1, 1024, 1024], DType::BF16, &mut rng, &g);
    let product = || linear::linear_forward(&x, &w, None, DType::BF16, None).unwrap();
    product();
    let time = |n: usize| {
        let (ys, s) = g
            .time(|| (0..n).map(|_| product()).collect::<Vec<_>>())
            .unwrap();
        assert_eq!(ys.len(), n);
        s
    };
    let (one, ten) = (time(1), time(10));
    eprintln!(
        "event timer: 1 GEMM {:.1} us, 10 GEMMs {:.1} us",
        one * 1e6,
        ten * 1e6
    );
    assert!(
        one > 0.0 && ten > 3.0 * one,
        "1 product {one} s, 10 products {ten} s"
    );
}

/// Data staged on another thread (through page-locked memory from 1 MiB up, as a batch's images)
/// becomes the same f32 tensor on the GPU as on the CPU, element for element; staging two in a
/// row before either goes up keeps both intact.
#[test]
fn staged_data_arrives_whole() {
    let Some(g) = gpu() else { return };
    let mut rng = Rng::new(44);
    for n in [5usize, loren_kernels::STAGING_MIN_BYTES / 4 + 3] {
        let a: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        let b: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        let (sa, sb) = std::thread::scope(|s| {
            let sa = s
                .spawn(|| Staged::new(&a, [n], &g).unwrap())
                .join()
                .unwrap();
            let sb = s
                .spawn(|| Staged::new(&b, [1, n], &g).unwrap())
                .join()
                .unwrap();
            (sa, sb)
        });
        let ta = Tensor::from_staged(sa, MemTag::Workspace).unwrap();
        let tb = Tensor::from_staged(sb, MemTag::Workspace).unwrap();
        assert_eq!(tb.dims(), &[1, n]);
        assert!(ta.to_vec().unwrap() == a, "{n} staged values differ");
        assert!(tb.to_vec().unwrap() == b, "{n} staged values differ");
        let on_cpu = Tensor::from_staged(Staged::new(&a, [n], &cpu()).unwrap(), MemTag::Workspace);
        assert!(on_cpu.unwrap().to_vec().unwrap() == a);
    }
}
