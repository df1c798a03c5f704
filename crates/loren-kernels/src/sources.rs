//! The kernel sources (`kernels/*.cu`, compiled into the binary) and the registry of every
//! kernel a launcher may call. Launchers name kernels only through [`Kernel`], and the compile
//! check asserts each one is an `.entry` of its file's PTX, so a renamed kernel cannot slip by.

use crate::compile::Arch;

/// One `kernels/*.cu` file.
#[derive(Debug)]
pub struct KernelSource {
    /// The file name under `kernels/`, e.g. `lora.cu`.
    pub file: &'static str,
    /// The CUDA C source.
    pub code: &'static str,
}

impl KernelSource {
    /// The registered kernels of this file that a build for `arch` holds.
    pub fn kernels(&self, arch: Arch) -> impl Iterator<Item = Kernel> + '_ {
        Kernel::ALL
            .iter()
            .copied()
            .filter(move |k| k.file() == self.file && k.built_for(arch))
    }
}

impl Kernel {
    /// Whether a build for `arch` holds this kernel: the wgmma kernels exist only in `sm_90a`
    /// builds (their source is under `__CUDA_ARCH_FEAT_SM90_ALL`).
    pub fn built_for(self, arch: Arch) -> bool {
        let wgmma = matches!(
            self,
            Kernel::LoraFwdWgmma
                | Kernel::LoraFwdWgmmaPrefix
                | Kernel::LoraBwdDxWgmma
                | Kernel::LoraBwdDxWgmmaPrefix
        );
        !wgmma || arch == Arch::SM90A
    }
}

/// `kernels/common.cuh`, given to NVRTC as an in-memory header named `common.cuh`.
pub const COMMON_HEADER: &str = include_str!("../../../kernels/common.cuh");
pub const COMMON_HEADER_NAME: &str = "common.cuh";

macro_rules! sources {
    ($($file:literal => $path:literal { $($variant:ident = $name:literal,)* })*) => {
        /// Every kernel source, in a fixed order.
        pub static SOURCES: &[KernelSource] = &[
            $(KernelSource { file: $file, code: include_str!($path) },)*
        ];

        /// Every kernel (entry point) a launcher uses.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Kernel {
            $($($variant,)*)*
        }

        impl Kernel {
            pub const ALL: &'static [Kernel] = &[$($(Kernel::$variant,)*)*];

            /// The `extern "C"` name of the kernel.
            pub fn name(self) -> &'static str {
                match self {
                    $($(Kernel::$variant => $name,)*)*
                }
            }

            /// The file under `kernels/` that defines it.
            pub fn file(self) -> &'static str {
                match self {
                    $($(Kernel::$variant => $file,)*)*
                }
            }
        }
    };
}

sources! {
    "lora.cu" => "../../../kernels/lora.cu" {
        LoraU = "lora_u",
        LoraV = "lora_v",
        LoraFwdGemm = "lora_fwd_gemm",
        LoraFwdGemmPrefix = "lora_fwd_gemm_prefix",
        LoraFwdWgmma = "lora_fwd_wgmma",
        LoraFwdWgmmaPrefix = "lora_fwd_wgmma_prefix",
        LoraBwdDxGemm = "lora_bwd_dx_gemm",
        LoraBwdDxGemmPrefix = "lora_bwd_dx_gemm_prefix",
        LoraBwdDxWgmma = "lora_bwd_dx_wgmma",
        LoraBwdDxWgmmaPrefix = "lora_bwd_dx_wgmma_prefix",
        LoraGrads = "lora_grads",
    }
    "attention.cu" => "../../../kernels/attention.cu" {
        AttentionFwdD16 = "attention_fwd_d16",
        AttentionFwdD32 = "attention_fwd_d32",
        AttentionFwdD64 = "attention_fwd_d64",
        AttentionFwdD128 = "attention_fwd_d128",
        AttentionBwdDqD16 = "attention_bwd_dq_d16",
        AttentionBwdDqD32 = "attention_bwd_dq_d32",
        AttentionBwdDqD64 = "attention_bwd_dq_d64",
        AttentionBwdDqD128 = "attention_bwd_dq_d128",
        AttentionBwdDkvD16 = "attention_bwd_dkv_d16",
        AttentionBwdDkvD32 = "attention_bwd_dkv_d32",
        AttentionBwdDkvD64 = "attention_bwd_dkv_d64",
        AttentionBwdDkvD128 = "attention_bwd_dkv_d128",
        AttentionFwdDropkeyD16 = "attention_fwd_dropkey_d16",
        AttentionFwdDropkeyD32 = "attention_fwd_dropkey_d32",
        AttentionFwdDropkeyD64 = "attention_fwd_dropkey_d64",
        AttentionFwdDropkeyD128 = "attention_fwd_dropkey_d128",
        AttentionBwdDqDropkeyD16 = "attention_bwd_dq_dropkey_d16",
        AttentionBwdDqDropkeyD32 = "attention_bwd_dq_dropkey_d32",
        AttentionBwdDqDropkeyD64 = "attention_bwd_dq_dropkey_d64",
        AttentionBwdDqDropkeyD128 = "attention_bwd_dq_dropkey_d128",
        AttentionBwdDkvDropkeyD16 = "attention_bwd_dkv_dropkey_d16",
        AttentionBwdDkvDropkeyD32 = "attention_bwd_dkv_dropkey_d32",
        AttentionBwdDkvDropkeyD64 = "attention_bwd_dkv_dropkey_d64",
        AttentionBwdDkvDropkeyD128 = "attention_bwd_dkv_dropkey_d128",
    }
    "norm.cu" => "../../../kernels/norm.cu" {
        LayernormFwd = "layernorm_fwd",
        LayernormBwdDx = "layernorm_bwd_dx",
        LayernormBwdParamsPartial = "layernorm_bwd_params_partial",
    }
    "activation.cu" => "../../../kernels/activation.cu" {
        BiasGeluFwd = "bias_gelu_fwd",
        BiasGeluBwdDx = "bias_gelu_bwd_dx",
        BiasGeluBwd = "bias_gelu_bwd",
    }
    "embed.cu" => "../../../kernels/embed.cu" {
        Patchify = "patchify",
        PatchifyBf16 = "patchify_bf16",
        EmbedTokensFwd = "embed_tokens_fwd",
        EmbedTokensBwdPatches = "embed_tokens_bwd_patches",
        ClassTokenFwd = "class_token_fwd",
        ClassTokenBwd = "class_token_bwd",
    }
    "loss.cu" => "../../../kernels/loss.cu" {
        SoftmaxXentRows = "softmax_xent_rows",
        SoftmaxXentMean = "softmax_xent_mean",
        SoftmaxRows = "softmax_rows",
    }
    "optim.cu" => "../../../kernels/optim.cu" {
        AdamwMulti = "adamw_multi",
        SgdMulti = "sgd_multi",
        GradSumsqMulti = "grad_sumsq_multi",
        ClipCoef = "clip_coef",
        GradScaleMulti = "grad_scale_multi",
    }
    "elementwise.cu" => "../../../kernels/elementwise.cu" {
        AddBf16 = "add_bf16",
        AddF32 = "add_f32",
        ScaleBf16 = "scale_bf16",
        ScaleF32 = "scale_f32",
        SumGroupsBf16 = "sum_groups_bf16",
        SumGroupsF32 = "sum_groups_f32",
        SumRowsPartialBf16 = "sum_rows_partial_bf16",
        SumRowsPartialF32 = "sum_rows_partial_f32",
        ReducePartials = "reduce_partials",
        SumsqPartialF32 = "sumsq_partial_f32",
        SumsqFinish = "sumsq_finish",
        F32ToBf16 = "f32_to_bf16",
        Bf16ToF32 = "bf16_to_f32",
        FillF32 = "fill_f32",
        FillBf16 = "fill_bf16",
        AddBiasRowsBf16 = "add_bias_rows_bf16",
        AddBiasRowsF32 = "add_bias_rows_f32",
    }
}

/// The source of one file, by name.
pub fn source(file: &str) -> Option<&'static KernelSource> {
    SOURCES.iter().find(|s| s.file == file)
}
