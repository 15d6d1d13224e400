//! The paper's analyses of generated text and programs: degeneration (rep-n, intra-response
//! Self-BLEU-4) in [`degeneration`], and why generated programs fail in [`failures`].

pub mod degeneration;
pub mod failures;

pub use degeneration::{degeneration, Degeneration};
pub use failures::{FailureClass, FailureCount};
pub mod report;
