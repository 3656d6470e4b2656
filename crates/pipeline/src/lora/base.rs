//! The tensors a network was built from, kept so that the network can be built again with
//! some of its weights replaced. Recording costs no memory: a candle tensor is a shared
//! handle, and the recorded ones are those the loaded network holds.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::weights::WeightStore;

/// A network's weights by tensor name, as its constructor read them.
#[derive(Clone)]
pub struct BaseWeights {
    tensors: Arc<HashMap<String, Tensor>>,
    /// Every tensor name the weight files have: a constructor may ask whether one exists
    /// without reading it.
    names: Arc<HashSet<String>>,
    dtype: DType,
    device: Device,
}

/// A [`VarBuilder`] over `store` and a handle that becomes the [`BaseWeights`] once the
/// network is built (and the builder dropped).
pub fn recording(
    store: WeightStore,
    dtype: DType,
    device: &Device,
) -> (VarBuilder<'static>, Recording) {
    let names = store.shapes().map(|(n, _)| n.to_string()).collect();
    let tensors = Arc::new(Mutex::new(HashMap::new()));
    let backend = Recorder {
        store,
        tensors: tensors.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let recording = Recording {
        tensors,
        names: Arc::new(names),
        dtype,
        device: device.clone(),
    };
    (vb, recording)
}

/// What a [`recording`] builder has read so far.
pub struct Recording {
    tensors: Arc<Mutex<HashMap<String, Tensor>>>,
    names: Arc<HashSet<String>>,
    dtype: DType,
    device: Device,
}

impl Recording {
    pub fn finish(self) -> BaseWeights {
        let tensors =
            std::mem::take(&mut *self.tensors.lock().unwrap_or_else(PoisonError::into_inner));
        BaseWeights {
            tensors: Arc::new(tensors),
            names: self.names,
            dtype: self.dtype,
            device: self.device,
        }
    }
}

struct Recorder {
    store: WeightStore,
    tensors: Arc<Mutex<HashMap<String, Tensor>>>,
}

impl Recorder {
    fn keep(&self, name: &str, t: candle_core::Result<Tensor>) -> candle_core::Result<Tensor> {
        let t = t?;
        self.tensors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), t.clone());
        Ok(t)
    }
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.keep(name, self.store.get(s, name, h, dtype, dev))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.keep(name, self.store.get_unchecked(name, dtype, dev))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.store.contains_tensor(name)
    }
}

impl BaseWeights {
    /// The weight of a module (`<module>.weight`), as the network holds it.
    pub fn weight(&self, module: &str) -> Option<&Tensor> {
        self.tensors.get(&format!("{module}.weight"))
    }

    /// A builder serving these weights, with `replaced` (by tensor name) in place of theirs.
    pub fn with(&self, replaced: HashMap<String, Tensor>) -> VarBuilder<'static> {
        let backend = Replaced {
            base: self.clone(),
            replaced,
        };
        VarBuilder::from_backend(Box::new(backend), self.dtype, self.device.clone())
    }
}

struct Replaced {
    base: BaseWeights,
    replaced: HashMap<String, Tensor>,
}

impl Replaced {
    fn tensor(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self
            .replaced
            .get(name)
            .or_else(|| self.base.tensors.get(name))
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("tensor `{name}` was not read at load"))
            })?;
        // Built again exactly as at load: another dtype or device would be a bug, not a cast.
        if t.dtype() != dtype || !t.device().same_device(dev) {
            candle_core::bail!(
                "tensor `{name}` was read as {:?} on {:?}, now asked for as {dtype:?} on {dev:?}",
                t.dtype(),
                t.device()
            );
        }
        Ok(t.clone())
    }
}

impl SimpleBackend for Replaced {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.tensor(name, dtype, dev)?;
        if t.dims() != s.dims() {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` has shape {:?}, expected {:?}",
                t.dims(),
                s.dims()
            )));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.tensor(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.names.contains(name)
    }
}
