//! A base model ready to serve: its directory, weights on a device, tokenizer and chat template.

use std::sync::Arc;

use candle_core::{DType, Device};

use crate::chat_template::ChatTemplate;
use crate::checkpoint::{CheckpointError, ModelDir};
use crate::engine::model::DecoderModel;

/// Where weights live and in which precision: CPU f32, or CUDA bf16 with the `cuda` feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    /// The device and its default precision.
    pub fn open(self) -> Result<(Device, DType), CheckpointError> {
        self.open_at(0)
    }

    /// The `ordinal`-th device of this kind (the CPU has one, whatever the ordinal) and its
    /// default precision.
    pub fn open_at(self, ordinal: usize) -> Result<(Device, DType), CheckpointError> {
        match self {
            DeviceKind::Cpu => Ok((Device::Cpu, DType::F32)),
            DeviceKind::Cuda => Ok((cuda_device(ordinal)?, DType::BF16)),
        }
    }
}

/// A CUDA device whose work goes to a stream of its own (the legacy default stream cannot be
/// captured into CUDA graphs, see [`crate::engine::graphs`]). Everything runs on that one stream,
/// so cudarc's per-buffer events (cross-stream synchronization) are turned off before anything
/// is allocated: they would be recorded inside captures and waited on outside them.
pub fn cuda_device(ordinal: usize) -> Result<Device, CheckpointError> {
    let device = Device::new_cuda_with_stream(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = &device {
        // SAFETY: called before any buffer is allocated on this device's context; every launch
        // and copy of the engine is ordered on the device's single stream.
        unsafe { cuda.disable_event_tracking() };
    }
    Ok(device)
}

/// `--dtype`: the precision weights and activations are held in, as vLLM's flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ComputeDtype {
    /// bf16 on CUDA, f32 on the CPU.
    #[default]
    Auto,
    Bf16,
    F16,
    F32,
}

/// `--sampler`: where sampled tokens (temperature > 0) are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SamplerPlace {
    /// On the GPU with CUDA, on the host with the CPU engine.
    #[default]
    Auto,
    /// Every sampled row's logits copied to the host and sampled there.
    Host,
    /// Drawn on the GPU (CUDA only); rows with penalties or top logprobs still go to the host.
    Device,
}

impl SamplerPlace {
    /// Whether the engine on `device` draws on the device, or why `--sampler device` cannot.
    pub fn on_device(self, device: DeviceKind) -> Result<bool, &'static str> {
        match (self, device) {
            (SamplerPlace::Host, _) | (SamplerPlace::Auto, DeviceKind::Cpu) => Ok(false),
            (SamplerPlace::Device, DeviceKind::Cpu) => {
                Err("--sampler device draws on a CUDA device; the CPU engine samples on the host")
            }
            (_, DeviceKind::Cuda) => Ok(true),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("--dtype {} is not available on {}: {reason}", .dtype.name(), .device.name())]
pub struct UnsupportedDtype {
    pub device: DeviceKind,
    pub dtype: ComputeDtype,
    pub reason: &'static str,
}

impl DeviceKind {
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

impl ComputeDtype {
    pub fn name(self) -> &'static str {
        match self {
            ComputeDtype::Auto => "auto",
            ComputeDtype::Bf16 => "bf16",
            ComputeDtype::F16 => "f16",
            ComputeDtype::F32 => "f32",
        }
    }

    /// The precision on `device`, or why there is none.
    pub fn on(self, device: DeviceKind) -> Result<DType, UnsupportedDtype> {
        let refuse = |reason| {
            Err(UnsupportedDtype {
                device,
                dtype: self,
                reason,
            })
        };
        match (device, self) {
            (DeviceKind::Cpu, ComputeDtype::Auto | ComputeDtype::F32) => Ok(DType::F32),
            (DeviceKind::Cpu, _) => refuse("the CPU engine runs f32"),
            (DeviceKind::Cuda, ComputeDtype::Auto | ComputeDtype::Bf16) => Ok(DType::BF16),
            (DeviceKind::Cuda, ComputeDtype::F32) => Ok(DType::F32),
            (DeviceKind::Cuda, ComputeDtype::F16) => refuse(
                "the CUDA kernels (fused.cu, attention.cu, sampling.cu) are built for bf16 and f32",
            ),
        }
    }
}

/// A tokenizer failure on some input.
#[derive(Debug, thiserror::Error)]
#[error("tokenizer: {0}")]
pub struct TokenizeError(#[source] tokenizers::Error);

pub struct LoadedModel {
    pub dir: ModelDir,
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    pub chat_template: Option<ChatTemplate>,
    pub model: Arc<DecoderModel>,
}

impl LoadedModel {
    pub fn load(id_or_path: &str, device: &Device, dtype: DType) -> Result<Self, CheckpointError> {
        let mut dir = ModelDir::resolve(id_or_path)?;
        let tokenizer = dir.load_tokenizer()?;
        let chat_template = match &dir.chat_template {
            Some(src) => Some(
                ChatTemplate::new(src, dir.bos_token.as_deref(), dir.eos_token.as_deref())
                    .map_err(|e| CheckpointError::Tokenizer(e.to_string()))?,
            ),
            None => None,
        };
        let model = Arc::new(DecoderModel::load(&dir, device, dtype)?);
        Ok(Self {
            dir,
            tokenizer: Arc::new(tokenizer),
            chat_template,
            model,
        })
    }

    /// Token ids of `text` (special tokens in the text are recognised; no BOS is added unless the
    /// tokenizer's post-processor adds one).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizeError> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(TokenizeError)
    }

    /// Bytes of the longest vocabulary entry (added tokens included), as the tokenizer spells
    /// it; no token covers more bytes of a text than this.
    pub fn max_token_bytes(&self) -> usize {
        self.tokenizer
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, false).unwrap_or_default()
    }
}
