//! `full`: full fine-tuning. Every weight of the foundation model is trained, with the head where the model has
//! one (an encoder's: embeddings, norms and linear layers; a generative model's: every linear layer of the
//! body, see [`crate::models::generative::Generative::set_body_trainable`]).

use super::task::TaskModel;

pub fn prepare(model: &mut dyn TaskModel) -> Vec<String> {
    model.set_base_trainable(true);
    Vec::new()
}
