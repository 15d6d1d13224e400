//! A layer-importance run as work for a base's engine loop: one calibration chunk per turn between
//! generation steps, its report (or error) sent back once. A client that goes away stops it.

use tokio::sync::oneshot;

use super::{ImportanceError, ImportanceReport, ImportanceRun, Metric};
use crate::scheduler::EngineTask;

pub struct ImportanceTask {
    run: ImportanceRun,
    metric: Metric,
    drop: usize,
    reply: Option<oneshot::Sender<Result<ImportanceReport, ImportanceError>>>,
}

impl ImportanceTask {
    /// The task and where its result arrives.
    pub fn new(
        run: ImportanceRun,
        metric: Metric,
        drop: usize,
    ) -> (
        Self,
        oneshot::Receiver<Result<ImportanceReport, ImportanceError>>,
    ) {
        let (tx, rx) = oneshot::channel();
        let task = Self {
            run,
            metric,
            drop,
            reply: Some(tx),
        };
        (task, rx)
    }

    fn finish(&mut self, result: Result<ImportanceReport, ImportanceError>) -> bool {
        if let Some(tx) = self.reply.take() {
            let _ = tx.send(result);
        }
        true
    }
}

impl EngineTask for ImportanceTask {
    fn is_abandoned(&self) -> bool {
        self.reply.as_ref().is_none_or(|tx| tx.is_closed())
    }

    fn advance(&mut self) -> bool {
        if self.is_abandoned() {
            return true;
        }
        match self.run.advance() {
            Ok(false) => false,
            Ok(true) => {
                let report = self.run.report(self.metric, self.drop);
                self.finish(report)
            }
            Err(e) => self.finish(Err(e)),
        }
    }
}
