//! What a model exposes so that LoRA adapters can be put on its linear layers, whatever its architecture.

use super::bank::{BankLinear, Composition, LoraModule};
use super::peft::Adapter;
use anyhow::{bail, Result};

/// A model whose linear layers are `BankLinear`s addressed by PEFT-style module paths.
pub trait LinearHost {
    /// Every adaptable linear module's canonical path, in a fixed order.
    fn linear_paths(&self) -> Vec<String>;
    /// The linear module at a canonical path.
    fn linear_mut(&mut self, path: &str) -> Option<&mut BankLinear>;
    /// Map a module path as an adapter keys it (after PEFT's `base_model.model.` is stripped) onto a canonical
    /// path, or `None` when the model has no such module. Architectures whose adapters come under several
    /// naming schemes (classic Hugging Face names, transformers-5 runtime names) accept all of them here.
    fn resolve(&self, module: &str) -> Option<String> {
        let paths = self.linear_paths();
        paths.iter().any(|p| p == module).then(|| module.to_string())
    }
    /// A few words describing the model for error messages (e.g. "6 layers").
    fn describe(&self) -> String;
}

/// Put the bank's modules on every linear layer some adapter targets, in bank order (an adapter that does not
/// target a layer takes part there with rank 0, so module `n` means adapter `n` in every layer), with the
/// composition `comp(layer_path, N)`. Returns the adapted canonical layer paths.
pub fn attach_adapters(
    host: &mut dyn LinearHost,
    bank: &[Adapter],
    mut comp: impl FnMut(&str, usize) -> Composition,
) -> Result<Vec<String>> {
    // Resolve every adapter's module names first, so that nothing is attached when one of them is wrong.
    let mut resolved: Vec<std::collections::BTreeMap<String, &crate::lora::peft::ModuleLora>> = Vec::new();
    for a in bank {
        let mut map = std::collections::BTreeMap::new();
        for (m, lora) in &a.modules {
            let Some(path) = host.resolve(m) else {
                bail!(
                    "{}: adapter targets module '{m}', which this model does not have ({})",
                    a.dir.display(),
                    host.describe()
                );
            };
            if map.insert(path.clone(), lora).is_some() {
                bail!("{}: module '{path}' appears twice (under two names)", a.dir.display());
            }
        }
        resolved.push(map);
    }
    let mut used = Vec::new();
    for path in host.linear_paths() {
        if !resolved.iter().any(|m| m.contains_key(&path)) {
            continue;
        }
        let lin = host.linear_mut(&path).expect("linear_paths lists only existing modules");
        let mut mods = Vec::new();
        for (a, map) in bank.iter().zip(&resolved) {
            match map.get(&path) {
                Some(m) => {
                    if m.din != lin.din || m.dout != lin.dout {
                        bail!(
                            "{}: module '{path}' is [{} → {}] but the model's layer is [{} → {}]; the adapter was made for another base model",
                            a.dir.display(),
                            m.din,
                            m.dout,
                            lin.din,
                            lin.dout
                        );
                    }
                    mods.push(LoraModule { a: m.a.clone(), b: m.b.clone(), r: m.r, scale: m.scale });
                }
                None => mods.push(LoraModule { a: Vec::new(), b: Vec::new(), r: 0, scale: 0.0 }),
            }
        }
        let n = mods.len();
        lin.set_bank(mods);
        lin.comp = comp(&path, n);
        used.push(path);
    }
    Ok(used)
}
