//! `loracomp._loracomp`: the PyO3 extension behind the `loracomp` Python package.
//!
//! Each function maps its keyword options onto the application layer's specs (`loracomp::app`), exactly as the
//! CLI maps its flags, and runs it with the GIL released on a worker of loracomp's rayon pool (as `cli::run`
//! does). Results come back as JSON text (the values metrics.json holds) that the Python wrappers decode;
//! embeddings come back as a numpy float32 array. A loracomp error is raised as `loracomp.LoracompError` with
//! the whole error chain (`{:#}`); an unknown option is a `TypeError` and a bad value a `ValueError`, each
//! naming the option.

use loracomp::app::{AdaptSpec, Common, ComposeSpec, MethodOptions, PredictInput, TrainSpec};
use loracomp::data::{Example, Examples, Shots};
use loracomp::engine::kernels::Pooling;
use loracomp::methods::{Method, Retrieval};
use loracomp::models::encoder::LoadedModel;
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::path::PathBuf;
use std::sync::Mutex;

create_exception!(
    _loracomp,
    LoracompError,
    PyRuntimeError,
    "An error reported by loracomp (the message names the file and field)."
);

fn lc_err(e: anyhow::Error) -> PyErr {
    LoracompError::new_err(format!("{e:#}"))
}

/// Run `f` with the GIL released, on a worker of loracomp's pool (built once: `LORACOMP_THREADS` threads, or
/// one per core), so that its parallel loops share the pool as the CLI's do.
fn run<T: Send>(py: Python<'_>, f: impl FnOnce() -> anyhow::Result<T> + Send) -> PyResult<T> {
    let threads = match std::env::var("LORACOMP_THREADS") {
        Ok(s) if !s.trim().is_empty() => match s.trim().parse::<usize>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                return Err(PyValueError::new_err(format!("LORACOMP_THREADS='{s}': expected a positive whole number")))
            }
        },
        _ => None,
    };
    py.detach(move || {
        loracomp::util::init_pool(threads)?;
        rayon::scope(move |_| f())
    })
    .map_err(lc_err)
}

/// Keyword options, taken one by one; whatever is left is an unknown option.
struct Opts<'py> {
    func: &'static str,
    d: Bound<'py, PyDict>,
}

impl<'py> Opts<'py> {
    fn new(func: &'static str, d: Option<&Bound<'py, PyDict>>, py: Python<'py>) -> PyResult<Self> {
        let d = match d {
            Some(d) => d.copy()?,
            None => PyDict::new(py),
        };
        Ok(Opts { func, d })
    }

    /// The value of `name`, removed from the options; `None` when absent or None.
    fn take(&self, name: &str) -> PyResult<Option<Bound<'py, PyAny>>> {
        let v = self.d.get_item(name)?;
        if v.is_some() {
            self.d.del_item(name)?;
        }
        Ok(v.filter(|v| !v.is_none()))
    }

    fn bad_type(&self, name: &str, want: &str, v: &Bound<'py, PyAny>) -> PyErr {
        let ty = v.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!("{}(): option '{name}' must be {want}, got {ty}", self.func))
    }

    fn bad_value(&self, name: &str, msg: impl std::fmt::Display) -> PyErr {
        PyValueError::new_err(format!("{}(): option '{name}': {msg}", self.func))
    }

    fn int(&self, name: &str) -> PyResult<Option<i64>> {
        match self.take(name)? {
            None => Ok(None),
            Some(v) if v.is_instance_of::<pyo3::types::PyBool>() => Err(self.bad_type(name, "an integer", &v)),
            Some(v) => v.extract::<i64>().map(Some).map_err(|_| self.bad_type(name, "an integer", &v)),
        }
    }

    /// A whole number ≥ 1 (the CLI's `positive` flags: ranks, batch sizes, step counts).
    fn positive(&self, name: &str) -> PyResult<Option<usize>> {
        match self.int(name)? {
            None => Ok(None),
            Some(n) if n >= 1 => Ok(Some(n as usize)),
            Some(n) => Err(self.bad_value(name, format!("{n} is not a positive whole number"))),
        }
    }

    /// A whole number ≥ 0 (seeds, counts whose 0 the application layer judges).
    fn count(&self, name: &str) -> PyResult<Option<u64>> {
        match self.int(name)? {
            None => Ok(None),
            Some(n) if n >= 0 => Ok(Some(n as u64)),
            Some(n) => Err(self.bad_value(name, format!("{n} is negative"))),
        }
    }

    fn float(&self, name: &str) -> PyResult<Option<f32>> {
        match self.take(name)? {
            None => Ok(None),
            Some(v) if v.is_instance_of::<pyo3::types::PyBool>() => Err(self.bad_type(name, "a number", &v)),
            Some(v) => v.extract::<f64>().map(|x| Some(x as f32)).map_err(|_| self.bad_type(name, "a number", &v)),
        }
    }

    fn flag(&self, name: &str) -> PyResult<bool> {
        match self.take(name)? {
            None => Ok(false),
            Some(v) => v.extract::<bool>().map_err(|_| self.bad_type(name, "True or False", &v)),
        }
    }

    fn string(&self, name: &str) -> PyResult<Option<String>> {
        match self.take(name)? {
            None => Ok(None),
            Some(v) => v.extract::<String>().map(Some).map_err(|_| self.bad_type(name, "a string", &v)),
        }
    }

    fn path(&self, name: &str) -> PyResult<Option<PathBuf>> {
        match self.take(name)? {
            None => Ok(None),
            Some(v) => {
                v.extract::<PathBuf>().map(Some).map_err(|_| self.bad_type(name, "a path (str or os.PathLike)", &v))
            }
        }
    }

    fn required_path(&self, name: &str) -> PyResult<PathBuf> {
        self.path(name)?.ok_or_else(|| PyTypeError::new_err(format!("{}(): missing option '{name}'", self.func)))
    }

    /// A list of paths (a single path is a list of one).
    fn paths(&self, name: &str) -> PyResult<Vec<PathBuf>> {
        let Some(v) = self.take(name)? else { return Ok(Vec::new()) };
        if let Ok(p) = v.extract::<PathBuf>() {
            return Ok(vec![p]);
        }
        let mut out = Vec::new();
        let it = v.try_iter().map_err(|_| self.bad_type(name, "a list of paths", &v))?;
        for x in it {
            let x = x?;
            out.push(x.extract::<PathBuf>().map_err(|_| self.bad_type(name, "a list of paths", &x))?);
        }
        Ok(out)
    }

    /// A list of strings, or one comma-separated string (as the CLI's `--targets a,b`).
    fn strings(&self, name: &str) -> PyResult<Option<Vec<String>>> {
        let Some(v) = self.take(name)? else { return Ok(None) };
        if let Ok(s) = v.extract::<String>() {
            return Ok(Some(s.split(',').map(|t| t.trim().to_string()).collect()));
        }
        let mut out = Vec::new();
        let it = v.try_iter().map_err(|_| self.bad_type(name, "a list of strings", &v))?;
        for x in it {
            let x = x?;
            out.push(x.extract::<String>().map_err(|_| self.bad_type(name, "a list of strings", &x))?);
        }
        Ok(Some(out))
    }

    fn floats(&self, name: &str) -> PyResult<Vec<f32>> {
        let Some(v) = self.take(name)? else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        let it = v.try_iter().map_err(|_| self.bad_type(name, "a list of numbers", &v))?;
        for x in it {
            let x = x?;
            out.push(x.extract::<f64>().map_err(|_| self.bad_type(name, "a list of numbers", &x))? as f32);
        }
        Ok(out)
    }

    /// A list of numbers, `None` when not given (an empty list given is passed on, to be refused).
    fn floats_given(&self, name: &str) -> PyResult<Option<Vec<f32>>> {
        let Some(v) = self.take(name)? else { return Ok(None) };
        let mut out = Vec::new();
        let it = v.try_iter().map_err(|_| self.bad_type(name, "a list of numbers", &v))?;
        for x in it {
            let x = x?;
            out.push(x.extract::<f64>().map_err(|_| self.bad_type(name, "a list of numbers", &x))? as f32);
        }
        Ok(Some(out))
    }

    /// Shots: a positive whole number, or "full".
    fn shots(&self, name: &str) -> PyResult<Option<Shots>> {
        self.number_or_word::<Shots>(name, "a positive whole number or 'full'")
    }

    /// A whole number or a word (`auto_lora_from=16` or `"off"`), parsed as the CLI parses the flag.
    fn number_or_word<T: std::str::FromStr>(&self, name: &str, expected: &str) -> PyResult<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        let Some(v) = self.take(name)? else { return Ok(None) };
        let text = if let Ok(s) = v.extract::<String>() {
            s
        } else if v.is_instance_of::<pyo3::types::PyBool>() {
            return Err(self.bad_type(name, expected, &v));
        } else {
            match v.extract::<i64>() {
                Ok(k) => k.to_string(),
                Err(_) => return Err(self.bad_type(name, expected, &v)),
            }
        };
        text.parse::<T>().map(Some).map_err(|e| self.bad_value(name, e))
    }

    fn parsed<T: std::str::FromStr>(&self, name: &str) -> PyResult<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        match self.string(name)? {
            None => Ok(None),
            Some(s) => s.parse::<T>().map(Some).map_err(|e| self.bad_value(name, e)),
        }
    }

    /// Refuse whatever option was not taken, naming it.
    fn finish(self) -> PyResult<()> {
        let keys: Vec<String> = self.d.keys().iter().map(|k| k.to_string()).collect();
        match keys.as_slice() {
            [] => Ok(()),
            [k] => Err(PyTypeError::new_err(format!("{}() got an unexpected keyword argument '{k}'", self.func))),
            ks => Err(PyTypeError::new_err(format!(
                "{}() got unexpected keyword arguments: {}",
                self.func,
                ks.iter().map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// The options `train` and `adapt` share (the CLI's `TrainArgs`), with the CLI's defaults.
    fn common(&self) -> PyResult<Common> {
        let mut c = Common::new(self.required_path("model")?, self.required_path("task")?);
        c.seed = self.count("seed")?.unwrap_or(0);
        c.steps = self.positive("steps")?;
        c.batch = self.positive("batch")?.unwrap_or(16);
        c.lr = self.float("lr")?;
        c.lr_head = self.float("lr_head")?;
        c.weight_decay = self.float("weight_decay")?.unwrap_or(0.0);
        c.pooling = self.parsed::<Pooling>("pooling")?;
        if let Some(n) = self.positive("max_len")? {
            c.max_len = n;
        }
        c.template = self.string("template")?;
        c.eval_split = self.string("eval_split")?;
        if let Some(s) = &c.eval_split {
            if !matches!(s.as_str(), "train" | "valid" | "test") {
                return Err(self.bad_value("eval_split", format!("'{s}': expected train, valid or test")));
            }
        }
        c.force = self.flag("force")?;
        c.allow_base_mismatch = self.flag("allow_base_mismatch")?;
        Ok(c)
    }
}

fn json_text(v: &impl serde::Serialize) -> PyResult<String> {
    serde_json::to_string(v).map_err(|e| LoracompError::new_err(format!("cannot serialise the result: {e}")))
}

/// `loracomp train`: returns metrics.json's content as JSON text.
#[pyfunction]
#[pyo3(signature = (**options))]
fn train(py: Python<'_>, options: Option<&Bound<'_, PyDict>>) -> PyResult<String> {
    let o = Opts::new("train", options, py)?;
    let common = o.common()?;
    let spec = TrainSpec {
        common,
        out: o.required_path("out")?,
        rank: o.positive("rank")?.unwrap_or(16),
        alpha: o.float("alpha")?.unwrap_or(32.0),
        targets: o.strings("targets")?,
        epochs: o.positive("epochs")?.unwrap_or(3),
        shots: o.shots("shots")?.and_then(|s| s.0),
    };
    o.finish()?;
    let m = run(py, move || loracomp::app::train(&spec))?;
    json_text(&m)
}

/// `loracomp adapt`: returns metrics.json's content as JSON text.
#[pyfunction]
#[pyo3(signature = (**options))]
fn adapt(py: Python<'_>, options: Option<&Bound<'_, PyDict>>) -> PyResult<String> {
    let o = Opts::new("adapt", options, py)?;
    let common = o.common()?;
    let shots = o.shots("shots")?.ok_or_else(|| PyTypeError::new_err("adapt(): missing option 'shots'"))?;
    let method =
        o.parsed::<Method>("method")?.ok_or_else(|| PyTypeError::new_err("adapt(): missing option 'method'"))?;
    let spec = AdaptSpec {
        common,
        out: o.required_path("out")?,
        shots,
        method,
        bank: o.paths("bank")?,
        options: MethodOptions {
            rank: o.positive("rank")?,
            alpha: o.float("alpha")?,
            targets: o.strings("targets")?,
            global_weights: o.flag("global_weights")?,
            entropy_penalty: o.float("entropy_penalty")?,
            lorahub_generations: o.count("lorahub_generations")?.map(|g| g as usize),
            density: o.float("density")?,
            drop_p: o.float("drop_p")?,
            select: o.count("select")?.map(|k| k as usize),
            select_by: o.parsed::<Retrieval>("by")?,
            auto_scales: o.floats_given("auto_scales")?,
            auto_top_k: o.count("auto_top_k")?.map(|k| k as usize),
            auto_select: o.parsed::<loracomp::methods::auto::AutoSelect>("auto_select")?,
            auto_folds: o.count("auto_folds")?.map(|k| k as usize),
            auto_epochs: o.count("auto_epochs")?.map(|k| k as usize),
            auto_lora_from: o
                .number_or_word::<loracomp::methods::auto::LoraFrom>(
                    "auto_lora_from",
                    "a positive whole number or 'off'",
                )?
                .map(|l| l.0),
        },
        export_rank: o.positive("export_rank")?,
    };
    o.finish()?;
    let m = run(py, move || loracomp::app::adapt(&spec))?;
    json_text(&m)
}

/// `loracomp compose`: returns the summary the CLI prints, as JSON text.
#[pyfunction]
#[pyo3(signature = (**options))]
fn compose(py: Python<'_>, options: Option<&Bound<'_, PyDict>>) -> PyResult<String> {
    let o = Opts::new("compose", options, py)?;
    let spec = ComposeSpec {
        model: o.required_path("model")?,
        bank: o.paths("bank")?,
        weights: o.floats("weights")?,
        export_rank: o.positive("export_rank")?,
        out: o.required_path("out")?,
        force: o.flag("force")?,
        task: o.path("task")?,
        shots: o.shots("shots")?,
        seed: o.count("seed")?.unwrap_or(0),
        template: o.string("template")?,
    };
    o.finish()?;
    if spec.bank.is_empty() {
        return Err(PyValueError::new_err("compose(): option 'bank' must name at least one adapter directory"));
    }
    let m = run(py, move || loracomp::app::compose(&spec))?;
    json_text(&m)
}

/// `loracomp eval`: returns the metrics the CLI prints, as JSON text.
#[pyfunction]
#[pyo3(signature = (**options))]
fn eval(py: Python<'_>, options: Option<&Bound<'_, PyDict>>) -> PyResult<String> {
    let o = Opts::new("eval", options, py)?;
    let model = o.required_path("model")?;
    let task = o.required_path("task")?;
    let adapter = o.path("adapter")?;
    let template = o.string("template")?;
    let split = o.string("split")?.unwrap_or_else(|| "test".into());
    let max_len = o.positive("max_len")?.unwrap_or(loracomp::models::hf::DEFAULT_MAX_LEN);
    let allow = o.flag("allow_base_mismatch")?;
    o.finish()?;
    let target = loracomp::app::EvalTarget::new(adapter, allow, template).map_err(lc_err)?;
    let m = run(py, move || loracomp::app::eval(&model, &task, &target, &split, max_len))?;
    json_text(&m)
}

/// `loracomp predict`: returns the predictions (label and each label's probability) as JSON text.
#[pyfunction]
#[pyo3(signature = (**options))]
fn predict(py: Python<'_>, options: Option<&Bound<'_, PyDict>>) -> PyResult<String> {
    let o = Opts::new("predict", options, py)?;
    let model = o.required_path("model")?;
    let adapter = o.required_path("adapter")?;
    let texts = o.strings_exact("texts")?.unwrap_or_default();
    let pairs = o.strings_exact("text_pairs")?;
    let max_len = o.positive("max_len")?.unwrap_or(loracomp::models::hf::DEFAULT_MAX_LEN);
    o.finish()?;
    if texts.is_empty() {
        return Err(PyValueError::new_err("predict(): option 'texts' must hold at least one text"));
    }
    if let Some(p) = &pairs {
        if p.len() != texts.len() {
            return Err(PyValueError::new_err(format!(
                "predict(): option 'text_pairs' has {} values for {} texts",
                p.len(),
                texts.len()
            )));
        }
    }
    let inputs: Vec<PredictInput> = texts
        .into_iter()
        .enumerate()
        .map(|(i, text)| PredictInput { text, text_pair: pairs.as_ref().map(|p| p[i].clone()) })
        .collect();
    let preds = run(py, move || loracomp::app::predict(&model, &adapter, &inputs, max_len))?;
    json_text(&preds)
}

/// `loracomp sweep`: runs (or resumes) a sweep; returns the number of cells and the report's path as JSON text.
#[pyfunction]
#[pyo3(signature = (**options))]
fn sweep(py: Python<'_>, options: Option<&Bound<'_, PyDict>>) -> PyResult<String> {
    let o = Opts::new("sweep", options, py)?;
    let config = o.required_path("config")?;
    let out = o.required_path("out")?;
    let quiet = match o.take("quiet")? {
        None => true,
        Some(v) => v.extract::<bool>().map_err(|_| o.bad_type("quiet", "True or False", &v))?,
    };
    let force = o.flag("force")?;
    let tasks = o.strings("tasks")?.unwrap_or_default();
    o.finish()?;
    let out2 = out.clone();
    let res = run(py, move || {
        let mut opts = loracomp::experiments::sweep::SweepOpts::new(quiet, rayon::current_num_threads());
        opts.tasks = tasks;
        loracomp::experiments::sweep::run_config(&config, &out2, &opts, force)
    })?;
    json_text(&serde_json::json!({
        "cells": res.cells.len(),
        "out": out.display().to_string(),
        "report": out.join("report.md").display().to_string(),
    }))
}

impl Opts<'_> {
    /// A list of strings (one string is a list of one; no comma splitting: texts may hold commas).
    fn strings_exact(&self, name: &str) -> PyResult<Option<Vec<String>>> {
        let Some(v) = self.take(name)? else { return Ok(None) };
        if let Ok(s) = v.extract::<String>() {
            return Ok(Some(vec![s]));
        }
        let mut out = Vec::new();
        let it = v.try_iter().map_err(|_| self.bad_type(name, "a list of strings", &v))?;
        for x in it {
            let x = x?;
            out.push(x.extract::<String>().map_err(|_| self.bad_type(name, "a list of strings", &x))?);
        }
        Ok(Some(out))
    }
}

/// A model directory loaded once (any architecture loracomp supports); embeddings from an encoder's features.
#[pyclass(module = "loracomp._loracomp", name = "Model")]
struct Model {
    inner: Mutex<LoadedModel>,
    kind: String,
    path: String,
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (path, max_len = loracomp::models::hf::DEFAULT_MAX_LEN))]
    fn new(py: Python<'_>, path: PathBuf, max_len: usize) -> PyResult<Self> {
        if max_len == 0 {
            return Err(PyValueError::new_err("Model(): max_len must be a positive whole number"));
        }
        let p = path.clone();
        let lm = run(py, move || LoadedModel::load(&p, max_len))?;
        Ok(Model { kind: lm.kind.name().to_string(), path: path.display().to_string(), inner: Mutex::new(lm) })
    }

    /// The architecture: bert, vit, dinov2, t5 or llama.
    #[getter]
    fn kind(&self) -> &str {
        &self.kind
    }

    #[getter]
    fn path(&self) -> &str {
        &self.path
    }

    /// Pooled features of `texts` as little-endian f32 bytes with their row count and width.
    #[pyo3(signature = (texts, pooling = "mean", normalize = false, batch = 32))]
    fn embed_raw<'py>(
        &self,
        py: Python<'py>,
        texts: Vec<String>,
        pooling: &str,
        normalize: bool,
        batch: usize,
    ) -> PyResult<(Bound<'py, PyBytes>, usize, usize)> {
        let pooling =
            pooling.parse::<Pooling>().map_err(|e| PyValueError::new_err(format!("embed(): pooling: {e}")))?;
        if batch == 0 {
            return Err(PyValueError::new_err("embed(): batch must be a positive whole number"));
        }
        let n = texts.len();
        let inner = &self.inner;
        let rows = run(py, move || {
            let mut lm = inner.lock().map_err(|_| anyhow::anyhow!("the model was poisoned by an earlier failure"))?;
            let d = lm.encoder()?.hidden();
            if n == 0 {
                return Ok((Vec::new(), d));
            }
            let ex = Examples::Text(texts.into_iter().map(|text| Example { text, pair: None, label: 0 }).collect());
            let rows = loracomp::methods::common::embed_examples(&mut lm, &ex, pooling, normalize, batch)?;
            Ok((rows, d))
        })?;
        let (rows, d) = rows;
        let mut bytes = Vec::with_capacity(n * d * 4);
        for r in &rows {
            for x in r {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
        }
        Ok((PyBytes::new(py, &bytes), n, d))
    }

    fn __repr__(&self) -> String {
        format!("Model({:?}, kind={:?})", self.path, self.kind)
    }
}

#[pymodule]
fn _loracomp(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("LoracompError", m.py().get_type::<LoracompError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Model>()?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(adapt, m)?)?;
    m.add_function(wrap_pyfunction!(compose, m)?)?;
    m.add_function(wrap_pyfunction!(eval, m)?)?;
    m.add_function(wrap_pyfunction!(predict, m)?)?;
    m.add_function(wrap_pyfunction!(sweep, m)?)?;
    Ok(())
}
