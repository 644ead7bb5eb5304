//! The `run` answer stream: a queue of [`RunUpdate`]s between the run and a client that may read
//! slowly.
//!
//! No update that carries state is ever dropped (a 120-layer run must show 120 "mapped" lines,
//! however late the client reads); byte counts are coalesced instead: a layer's count still
//! queued is replaced by the newer one. So the queue holds at most the state updates of one run
//! (bounded by its layers) plus one count per layer, whatever the client does.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use gantry_api::RunUpdate;
use tokio::sync::Notify;

use crate::sync::lock;

#[derive(Debug, Default)]
struct State {
    queued: VecDeque<RunUpdate>,
    closed: bool,
}

/// The sending side; clones share one queue.
#[derive(Debug, Clone, Default)]
pub struct UpdateQueue {
    state: Arc<Mutex<State>>,
    added: Arc<Notify>,
}

impl UpdateQueue {
    /// Queues `update`, replacing a byte count of the same layer not sent yet.
    pub fn push(&self, update: RunUpdate) {
        let mut state = lock(&self.state);
        if let RunUpdate::Layer(progress) = &update
            && let Some(queued) = state.queued.iter_mut().find(
                |queued| matches!(queued, RunUpdate::Layer(old) if old.index == progress.index),
            )
        {
            *queued = update;
        } else {
            state.queued.push_back(update);
        }
        drop(state);
        self.added.notify_one();
    }

    /// Ends the stream after what is queued.
    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.added.notify_one();
    }

    async fn next(&self) -> Option<RunUpdate> {
        loop {
            {
                let mut state = lock(&self.state);
                if let Some(update) = state.queued.pop_front() {
                    return Some(update);
                }
                if state.closed {
                    return None;
                }
            }
            self.added.notified().await;
        }
    }

    /// The queue as an NDJSON body, one update a line.
    pub fn body(&self) -> Body {
        Body::from_stream(futures::stream::unfold(self.clone(), |queue| async move {
            let update = queue.next().await?;
            let mut line = serde_json::to_vec(&update).unwrap_or_default();
            line.push(b'\n');
            Some((Ok::<_, std::convert::Infallible>(Bytes::from(line)), queue))
        }))
    }
}

#[cfg(test)]
mod tests {
    use gantry_api::LayerProgress;

    use super::*;

    fn bytes(index: usize, received: u64) -> RunUpdate {
        RunUpdate::Layer(LayerProgress {
            index,
            received,
            size: 100,
        })
    }

    #[tokio::test]
    async fn state_updates_are_kept_and_byte_counts_coalesced() {
        let queue = UpdateQueue::default();
        // A client that reads nothing until the run is over.
        for layer in 0..120 {
            for received in [10, 50, 100] {
                queue.push(bytes(layer, received));
            }
            queue.push(RunUpdate::Progress(format!("layer {layer} mapped")));
        }
        queue.push(RunUpdate::Started("c".into()));
        queue.close();
        let mut updates = Vec::new();
        while let Some(update) = queue.next().await {
            updates.push(update);
        }
        let mapped = updates
            .iter()
            .filter(|u| matches!(u, RunUpdate::Progress(m) if m.ends_with("mapped")))
            .count();
        assert_eq!(mapped, 120, "no state update is dropped");
        let counts: Vec<_> = updates
            .iter()
            .filter_map(|u| match u {
                RunUpdate::Layer(p) => Some((p.index, p.received)),
                _ => None,
            })
            .collect();
        assert_eq!(counts.len(), 120, "one count per layer is left");
        assert!(
            counts.iter().all(|&(_, received)| received == 100),
            "the latest count wins"
        );
        assert_eq!(updates.last(), Some(&RunUpdate::Started("c".into())));
    }
}
