//! What loren-nn's training tests share.

use loren_nn::vit::Vit;

/// Every parameter's bits, in the model's order: two models compare equal only bit for bit.
pub fn param_bits(model: &Vit) -> Vec<Vec<u32>> {
    model
        .params()
        .iter()
        .map(|(_, p)| {
            p.value()
                .to_vec()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        })
        .collect()
}
