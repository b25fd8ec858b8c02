//! Compose two PEFT adapters with fixed weights through the library and write the result as one adapter.
//!
//! ```sh
//! cargo run --example compose -- tests/fixtures/tiny-bert tests/fixtures/peft/adapter_a tests/fixtures/peft/adapter_b /tmp/composed
//! ```

use loracomp::engine::kernels::Pooling;
use loracomp::lora::bank::Composition;
use loracomp::lora::peft::Adapter;
use loracomp::methods::bank::attach_bank;
use loracomp::methods::export::export_adapter;
use loracomp::models::bert::Bert;
use loracomp::models::classifier::Classifier;
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [model, a, b, out] = &args[..] else {
        anyhow::bail!("usage: compose MODEL_DIR ADAPTER_A ADAPTER_B OUT_DIR");
    };
    let bank = vec![Adapter::load(a)?, Adapter::load(b)?];
    // A BERT encoder with a 3-class head (the fixtures' adapters carry one; a composition keeps the first's).
    let mut clf = Classifier::new(Bert::load(model)?, Pooling::Mean, 3, 0);
    // W + 0.7·ΔW_a + 0.3·ΔW_b on every layer either adapter targets.
    let layers = attach_bank(&mut clf, &bank, |_, _| Composition::Fixed(vec![0.7, 0.3]))?;
    if let Some((shape, w, bias)) = &bank[0].head {
        if w.len() != clf.head.w.data.len() {
            anyhow::bail!("{}: head {shape:?} does not fit this model's 3-class head", a.display());
        }
        clf.head.w.data.copy_from_slice(w);
        if let Some(b) = clf.head.bias.as_mut() {
            b.data.copy_from_slice(bias);
        }
    }
    let meta = serde_json::json!({"method": "compose", "weights": [0.7, 0.3]});
    export_adapter(&mut clf, out, Some(model.display().to_string()), None, None, &meta)?;
    println!("composed {} layers into {}", layers.len(), out.display());
    Ok(())
}
