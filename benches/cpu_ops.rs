//! Criterion benches of the CPU ops behind a training step, forward and backward, and of a whole
//! training step: `cargo bench --bench cpu_ops` (filter with e.g. `-- lora_linear/fwd`).
//!
//! Shapes:
//! - `tiny`: the bundled model's, M = 16 members, B = 32, T = 17, D = 64 (4 heads, MLP 128,
//!   rank 8): 544 rows per member.
//! - `vitb`: ViT-B widths (768→768 and 768→2304, 12 heads, MLP 3072, r ∈ {4, 8, 16, 32}) with
//!   fewer rows than on a GPU, so a sample takes well under a second on 2 cores: M = 4 members of
//!   8 images × 50 tokens (400 rows per member; the GPU harness uses 1600).
//! - `train_step`: one `Trainer::step` (forward, backward, clipping, AdamW) of tiny at M = 16,
//!   batch 32, for LoRA-Ensemble and the explicit ensemble.
//!
//! Every op input is random; backward benches time the op's backward alone, from inputs and a
//! kept forward made once.

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, criterion_group, criterion_main};
use loren::bench::{bench_train_config, ensemble_config, random_batch};
use loren_nn::config::{Method, VitConfig};
use loren_nn::train::Trainer;
use loren_nn::vit::Vit;
use loren_tensor::ops::activation::{bias_gelu_backward, bias_gelu_forward};
use loren_tensor::ops::attention::attention_forward;
use loren_tensor::ops::dropkey::DropKey;
use loren_tensor::ops::linear::{Needs, linear_backward};
use loren_tensor::ops::lora::{lora_backward, lora_forward};
use loren_tensor::ops::norm::{layernorm_backward, layernorm_forward};
use loren_tensor::{Device, MemTag, Rng, Tensor};

/// The two ops whose signatures the CUDA backend extended, behind one place each.
mod shim {
    use loren_tensor::ops::attention::{AttentionGrads, AttentionOutput, attention_backward};
    use loren_tensor::ops::linear::linear_forward;
    use loren_tensor::{DType, Result, Tensor};

    /// The CPU computes in f32 whatever the output dtype asked for.
    pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        linear_forward(x, w, b, DType::F32, None)
    }

    pub fn attention_bwd(
        d_o: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        fwd: &AttentionOutput,
        heads: usize,
    ) -> Result<AttentionGrads> {
        attention_backward(d_o, q, k, v, &fwd.o, &fwd.lse, heads, None)
    }
}

struct Gen {
    rng: Rng,
    dev: Device,
}

impl Gen {
    fn new(seed: u64) -> Gen {
        Gen {
            rng: Rng::new(seed),
            dev: Device::cpu(),
        }
    }

    fn t(&mut self, dims: &[usize], std: f32) -> Tensor {
        Tensor::randn(
            dims.to_vec(),
            std,
            &mut self.rng,
            MemTag::Workspace,
            &self.dev,
        )
        .expect("a random tensor")
    }
}

/// (label, M, B, T) of the two shape families.
const TINY: (&str, usize, usize, usize) = ("tiny", 16, 32, 17);
const VITB: (&str, usize, usize, usize) = ("vitb", 4, 8, 50);

fn group<'a>(c: &'a mut Criterion, name: &str, heavy: bool) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    // Flat sampling: the same iteration count per sample, as criterion advises for long calls.
    g.sampling_mode(SamplingMode::Flat);
    g.sample_size(10);
    g.warm_up_time(Duration::from_millis(if heavy { 500 } else { 300 }));
    g.measurement_time(Duration::from_secs(if heavy { 4 } else { 2 }));
    g
}

fn lora(c: &mut Criterion) {
    let mut g = group(c, "lora_linear", true);
    // (label, M, B, T, K, N, ranks)
    let cases = [
        (TINY.0, TINY.1, TINY.2, TINY.3, 64, 64, vec![8]),
        (VITB.0, VITB.1, VITB.2, VITB.3, 768, 768, vec![4, 8, 16, 32]),
        (
            VITB.0,
            VITB.1,
            VITB.2,
            VITB.3,
            768,
            2304,
            vec![4, 8, 16, 32],
        ),
    ];
    let mut rnd = Gen::new(1);
    for (label, m, b, t, k, n, ranks) in cases {
        let x = rnd.t(&[m, b, t, k], 1.0);
        let x_shared = rnd.t(&[1, b, t, k], 1.0);
        let w = rnd.t(&[1, n, k], 0.02);
        let bias = rnd.t(&[1, n], 0.02);
        let dy = rnd.t(&[m, b, t, n], 0.1);
        for r in ranks {
            let a = rnd.t(&[m, r, k], 0.1);
            let bm = rnd.t(&[m, n, r], 0.1);
            let id = format!("{label}-{k}x{n}-r{r}");
            g.bench_function(format!("fwd/{id}"), |bch| {
                bch.iter(|| {
                    lora_forward(black_box(&x), &w, Some(&bias), &a, &bm, 1.0, None).unwrap()
                })
            });
            let out = lora_forward(&x, &w, Some(&bias), &a, &bm, 1.0, None).unwrap();
            g.bench_function(format!("bwd/{id}"), |bch| {
                bch.iter(|| {
                    let u = &out.u;
                    lora_backward(black_box(&dy), &x, &w, &a, &bm, u, 1.0, true, true, None)
                        .unwrap()
                })
            });
            if label == "tiny" {
                // The first block's q, k, v: one input shared by the members.
                g.bench_function(format!("fwd/{id}-shared-input"), |bch| {
                    bch.iter(|| {
                        lora_forward(black_box(&x_shared), &w, Some(&bias), &a, &bm, 1.0, None)
                            .unwrap()
                    })
                });
                let out = lora_forward(&x_shared, &w, Some(&bias), &a, &bm, 1.0, None).unwrap();
                g.bench_function(format!("bwd/{id}-shared-input-no-dx"), |bch| {
                    bch.iter(|| {
                        lora_backward(
                            black_box(&dy),
                            &x_shared,
                            &w,
                            &a,
                            &bm,
                            &out.u,
                            1.0,
                            false,
                            true,
                            None,
                        )
                        .unwrap()
                    })
                });
            }
        }
    }
    g.finish();
}

fn linear(c: &mut Criterion) {
    let mut g = group(c, "linear", true);
    // Shared frozen W over every member's rows (the MLP), and per-member W (explicit ensemble).
    let cases = [
        (TINY, 64, 128),
        (TINY, 128, 64),
        (VITB, 768, 768),
        (VITB, 768, 2304),
        (VITB, 768, 3072),
    ];
    let mut rnd = Gen::new(2);
    for ((label, m, b, t), k, n) in cases {
        let x = rnd.t(&[m, b, t, k], 1.0);
        let dy = rnd.t(&[m, b, t, n], 0.1);
        for (kind, gw) in [("shared-w", 1), ("per-member-w", m)] {
            let w = rnd.t(&[gw, n, k], 0.02);
            let bias = rnd.t(&[gw, n], 0.02);
            let id = format!("{label}-{k}x{n}-{kind}");
            g.bench_function(format!("fwd/{id}"), |bch| {
                bch.iter(|| shim::linear(black_box(&x), &w, Some(&bias)).unwrap())
            });
            // Frozen shared W: dX only. Per-member W (trained): dX, dW and db.
            let needs = Needs {
                dx: true,
                dw: gw > 1,
                db: gw > 1,
            };
            g.bench_function(format!("bwd/{id}"), |bch| {
                bch.iter(|| {
                    linear_backward(black_box(&dy), x.shape(), Some(&x), &w, true, needs, None)
                        .unwrap()
                })
            });
        }
    }
    g.finish();
}

fn attention(c: &mut Criterion) {
    let mut g = group(c, "attention", true);
    let cases = [(TINY, 64, 4), (VITB, 768, 12)];
    let mut rnd = Gen::new(3);
    for ((label, m, b, t), d, heads) in cases {
        let [q, k, v] = [0, 1, 2].map(|_| rnd.t(&[m, b, t, d], 1.0));
        let d_o = rnd.t(&[m, b, t, d], 0.1);
        let id = format!("{label}-T{t}-D{d}-H{heads}");
        g.bench_function(format!("fwd/{id}"), |bch| {
            bch.iter(|| attention_forward(black_box(&q), &k, &v, heads, None).unwrap())
        });
        // MC Dropout's: every score hashed, a fifth dropped.
        let drop = DropKey::new(0.2, 1, m).unwrap();
        g.bench_function(format!("fwd-dropkey/{id}"), |bch| {
            bch.iter(|| attention_forward(black_box(&q), &k, &v, heads, Some(&drop)).unwrap())
        });
        let out = attention_forward(&q, &k, &v, heads, None).unwrap();
        g.bench_function(format!("bwd/{id}"), |bch| {
            bch.iter(|| shim::attention_bwd(black_box(&d_o), &q, &k, &v, &out, heads).unwrap())
        });
    }
    g.finish();
}

fn layernorm(c: &mut Criterion) {
    let mut g = group(c, "layernorm", false);
    let mut rnd = Gen::new(4);
    for ((label, m, b, t), d) in [(TINY, 64), (VITB, 768)] {
        let x = rnd.t(&[m, b, t, d], 1.0);
        let gamma = rnd.t(&[1, d], 1.0);
        let beta = rnd.t(&[1, d], 0.1);
        let dy = rnd.t(&[m, b, t, d], 0.1);
        let id = format!("{label}-D{d}");
        g.bench_function(format!("fwd/{id}"), |bch| {
            bch.iter(|| layernorm_forward(black_box(&x), &gamma, &beta, 1e-6).unwrap())
        });
        let out = layernorm_forward(&x, &gamma, &beta, 1e-6).unwrap();
        // Frozen affine (LoRA): dx only.
        g.bench_function(format!("bwd/{id}"), |bch| {
            bch.iter(|| {
                layernorm_backward(
                    black_box(&dy),
                    &x,
                    &gamma,
                    &beta,
                    &out.mean,
                    &out.rstd,
                    true,
                    false,
                    None,
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

fn bias_gelu(c: &mut Criterion) {
    let mut g = group(c, "bias_gelu", false);
    let mut rnd = Gen::new(5);
    for ((label, m, b, t), n) in [(TINY, 128), (VITB, 3072)] {
        let x = rnd.t(&[m, b, t, n], 1.0);
        let bias = rnd.t(&[1, n], 0.1);
        let dy = rnd.t(&[m, b, t, n], 0.1);
        let id = format!("{label}-N{n}");
        g.bench_function(format!("fwd/{id}"), |bch| {
            bch.iter(|| bias_gelu_forward(black_box(&x), &bias).unwrap())
        });
        g.bench_function(format!("bwd/{id}"), |bch| {
            bch.iter(|| bias_gelu_backward(black_box(&dy), &x, &bias, true, false).unwrap())
        });
    }
    g.finish();
}

fn train_step(c: &mut Criterion) {
    let mut g = group(c, "train_step", true);
    let vit = VitConfig::tiny();
    let (m, b) = (16, 32);
    let batch = random_batch(&vit, b, 10, 0);
    for method in [Method::Lora, Method::Explicit] {
        let ens = ensemble_config(method, m, 10, 8);
        let mut model = Vit::new(&vit, &ens, &Device::cpu(), 0).unwrap();
        let mut trainer = Trainer::new(
            &mut model,
            &bench_train_config(b, 0, loren_nn::Activations::Keep),
            1 << 20,
        )
        .unwrap();
        g.bench_function(format!("tiny-{method}-M{m}-B{b}"), |bch| {
            bch.iter(|| trainer.step(black_box(&batch)).unwrap())
        });
    }
    g.finish();
}

criterion_group!(
    benches, lora, linear, attention, layernorm, bias_gelu, train_step
);
criterion_main!(benches);
