//! Looking inside the engine without changing what it computes: per-phase step times
//! ([`phase_times`]), the step log ([`step_stats`]) and per-layer taps ([`taps`]).

pub mod phase_times;
pub mod step_stats;
pub mod taps;
