//! Programmatic dependent launch (PDL, sm_90 and later): a kernel launched through [`launch`]
//! may begin while the kernel before it in its stream is still running, and waits for that
//! kernel inside (`grid_wait` in `attention/common.cuh`) after a prologue that reads only what
//! the host wrote (tables, weights); `grid_release` lets the next kernel begin early. In a CUDA
//! graph captured from the stream the dependency becomes a programmatic edge, so decode graphs
//! keep the overlap. The kernels must hold that contract (nothing another kernel wrote is read
//! or written before `grid_wait`); the ones launched here say so in their comments.
//!
//! Plain launches are kept where PDL cannot help or is not available: before sm_90, and with
//! `PRUNESERVE_PDL=0` (for A/B measurements). cudarc's launch builder cannot carry launch
//! attributes, so the kernels launched here come from their own loaded module
//! (`cuModuleLoadData` of the same PTX) and `cuLaunchKernelEx`.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{
    result, sys, CudaStream, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::Result;

/// A kernel's function handle in a module loaded for PDL launches (into the device's primary
/// context, which the process keeps for its whole life: the module is never unloaded).
#[derive(Clone, Copy)]
pub struct Kernel(sys::CUfunction);

// SAFETY: a CUfunction is a handle into a module that lives for the process; the driver API
// accepts it from any thread with the context current.
unsafe impl Send for Kernel {}
unsafe impl Sync for Kernel {}

/// Whether launches on `dev` use PDL: compute capability 9.0 or later, unless
/// `PRUNESERVE_PDL=0`. Read once per process (one GPU model per server).
pub fn enabled(dev: &CudaDevice) -> Result<bool> {
    static ON: OnceLock<bool> = OnceLock::new();
    if let Some(on) = ON.get() {
        return Ok(*on);
    }
    use sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as MAJOR;
    let major = dev.cuda_stream().context().attribute(MAJOR).w()?;
    let wanted = std::env::var("PRUNESERVE_PDL").map_or(true, |v| v != "0");
    Ok(*ON.get_or_init(|| wanted && major >= 9))
}

/// Kernel `name` of the PTX module `ptx` (`module` names it) on `dev`, loaded once per device.
fn kernel(dev: &CudaDevice, (module, ptx): Module, name: &str) -> Result<Kernel> {
    type Kernels = HashMap<(usize, &'static str, String), Kernel>;
    static KERNELS: OnceLock<Mutex<Kernels>> = OnceLock::new();
    let ctx = dev.cuda_stream().context().clone();
    let key = (ctx.ordinal(), module, name.to_string());
    let mut kernels = KERNELS
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .map_err(|_| candle_core::Error::Msg("the PDL kernels' lock is poisoned".into()))?;
    if let Some(k) = kernels.get(&key) {
        return Ok(*k);
    }
    ctx.bind_to_thread().w()?;
    let image = CString::new(ptx).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let symbol = CString::new(name).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    // SAFETY: `image` is a NUL-terminated PTX module built by build.rs, loaded into the
    // context just bound; the module is never unloaded, so the function handle stays valid.
    let func = unsafe {
        let m = result::module::load_data(image.as_ptr() as *const c_void).w()?;
        result::module::get_function(m, symbol).w()?
    };
    let k = Kernel(func);
    kernels.insert(key, k);
    Ok(k)
}

/// A PTX module: the name candle loads it under, and its text.
pub type Module = (&'static str, &'static str);

/// One kernel argument, passed by value (device pointers as 64-bit words).
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    F32(f32),
}

impl Arg {
    fn param(&mut self) -> *mut c_void {
        match self {
            Arg::Ptr(v) => v as *mut u64 as *mut c_void,
            Arg::I32(v) => v as *mut i32 as *mut c_void,
            Arg::F32(v) => v as *mut f32 as *mut c_void,
        }
    }
}

/// Launches kernel `name` of `module` on `stream` with `args`: with PDL where the device takes it
/// ([`enabled`]) and `overlap` allows it (a stream whose kernels wait for another stream through
/// events launches plainly), else through candle's loaded module.
///
/// # Safety
/// As for any kernel launch: `args` must match the kernel's parameters and the memory they point
/// to stay valid until the kernel has run. With `overlap`, the kernel must hold the PDL contract
/// of this module's comment.
pub unsafe fn run(
    dev: &CudaDevice,
    (stream, overlap): (&Arc<CudaStream>, bool),
    (module, name): (Module, &str),
    cfg: LaunchConfig,
    args: &mut [Arg],
) -> Result<()> {
    if overlap && enabled(dev)? {
        let kernel = kernel(dev, module, name)?;
        let mut params: Vec<*mut c_void> = args.iter_mut().map(Arg::param).collect();
        // SAFETY: the caller's contract; `params` points into `args`, which outlives the call.
        return unsafe { launch(stream, kernel, cfg, &mut params) };
    }
    let func = dev
        .get_or_load_custom_func(name, module.0, module.1)?
        .into_cuda_function();
    let mut b = stream.launch_builder(&func);
    for a in args.iter() {
        match a {
            Arg::Ptr(v) => b.arg(v),
            Arg::I32(v) => b.arg(v),
            Arg::F32(v) => b.arg(v),
        };
    }
    // SAFETY: the caller's contract.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// Launches `kernel` on `stream` with `params` (a pointer to each argument, in order) and the PDL
/// attribute.
///
/// # Safety
/// As for any kernel launch: `params` must match the kernel's parameters and every pointer in
/// them stay valid until the kernel has run. The kernel must hold the PDL contract of this
/// module's comment.
unsafe fn launch(
    stream: &CudaStream,
    kernel: Kernel,
    cfg: LaunchConfig,
    params: &mut [*mut c_void],
) -> Result<()> {
    stream.context().bind_to_thread().w()?;
    // SAFETY: all-zero is a valid launch attribute (id 0, an empty value), overwritten next.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attr.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    // SAFETY: the caller's contract; `config` and `attr` outlive the call, which copies them.
    unsafe {
        sys::cuLaunchKernelEx(&config, kernel.0, params.as_mut_ptr(), std::ptr::null_mut())
            .result()
            .w()
    }
}
