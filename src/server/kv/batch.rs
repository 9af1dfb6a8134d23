//! `BatchCommands`: many requests on one long-lived, bidirectional stream.
//!
//! A unary call costs an HTTP/2 stream of its own: headers both ways, a task, flow-control
//! bookkeeping. TiKV's Go client therefore sends its requests, by default, as batches on one
//! stream per store, each request tagged with an id, and takes the answers back the same way,
//! matched by id and in any order.
//!
//! Here the reader takes each incoming batch apart and runs every request as a task of its own,
//! through the very handler its unary RPC uses: a request behaves alike either way, errors
//! included. The writer sends whatever answers have finished since its last message, so under
//! load one message carries many answers, and an idle stream answers each at once.
//!
//! What ends a stream: the client closing its side (answers still in flight are sent first), a
//! request the store does not serve, or one its handler refuses outright (e.g. no context), as
//! a unary call would get. The status names the request's id.
//!
//! Bounds: at most `MAX_IN_FLIGHT` requests of one stream run at once. Past that the reader
//! stops reading, and HTTP/2 flow control pushes back on the client. An answer message holds at
//! most `MAX_ANSWERS_PER_MESSAGE` answers.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use prkv_proto::tikvpb::batch_commands_request::request::Cmd as Ask;
use prkv_proto::tikvpb::batch_commands_response::response::Cmd as Answer;
use prkv_proto::tikvpb::tikv_server::Tikv;
use prkv_proto::tikvpb::{
    batch_commands_request, batch_commands_response, BatchCommandsEmptyResponse,
    BatchCommandsRequest, BatchCommandsResponse,
};
use tokio::sync::{mpsc, Semaphore};
use tonic::{Request, Response, Status, Streaming};

use super::KvService;

/// The answer stream `BatchCommands` returns.
pub type BatchStream = Pin<Box<dyn Stream<Item = Result<BatchCommandsResponse, Status>> + Send>>;

/// Requests of one stream running at once. The Go client sends batches of up to 128 and keeps
/// a few in flight per connection; 1,024 leaves it room, while a stream's memory stays bounded
/// by 1,024 requests of at most `server.max-grpc-msg-len` each.
pub const MAX_IN_FLIGHT: usize = 1024;
/// Answers per message: enough that a loaded stream sends few messages, few enough that one
/// message stays far below the client's receive limit for small answers.
const MAX_ANSWERS_PER_MESSAGE: usize = 256;
/// An `Empty` probe may ask the store to wait before answering; this caps the wait, so a
/// client cannot park a stream's requests for long.
const MAX_EMPTY_DELAY: Duration = Duration::from_secs(1);

type Answered = Result<(u64, batch_commands_response::Response), Status>;

fn count(what: &str, n: usize) {
    crate::metrics::BATCH_COMMANDS
        .with_label_values(&[what])
        .inc_by(n as u64);
}

impl KvService {
    pub(super) async fn serve_batch_commands(
        &self,
        req: Request<Streaming<BatchCommandsRequest>>,
    ) -> Result<Response<BatchStream>, Status> {
        let mut inbound = req.into_inner();
        // As many slots as permits: a finished request never waits to hand its answer over.
        let (tx, rx) = mpsc::channel::<Answered>(MAX_IN_FLIGHT);
        let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let svc = self.clone();
        tokio::spawn(async move {
            loop {
                let batch = match inbound.message().await {
                    Ok(Some(b)) => b,
                    // The client closed its side, or went away.
                    Ok(None) => return,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                if batch.requests.len() != batch.request_ids.len() {
                    let refusal = Status::invalid_argument(format!(
                        "a batch of {} requests with {} request ids",
                        batch.requests.len(),
                        batch.request_ids.len()
                    ));
                    let _ = tx.send(Err(refusal)).await;
                    return;
                }
                count("request_messages", 1);
                count("requests", batch.requests.len());
                for (id, ask) in batch.request_ids.into_iter().zip(batch.requests) {
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        return;
                    };
                    let (svc, tx) = (svc.clone(), tx.clone());
                    tokio::spawn(async move {
                        let answered = svc.answer(ask).await.map(|a| (id, a)).map_err(|s| {
                            Status::new(s.code(), format!("request {id}: {}", s.message()))
                        });
                        let _ = tx.send(answered).await;
                        drop(permit);
                    });
                }
            }
        });
        Ok(Response::new(Box::pin(answers(rx))))
    }

    /// Runs one request through its unary handler.
    async fn answer(
        &self,
        ask: batch_commands_request::Request,
    ) -> Result<batch_commands_response::Response, Status> {
        let Some(ask) = ask.cmd else {
            return Err(Status::unimplemented(
                "a command this store does not serve in a batch (or none)",
            ));
        };
        macro_rules! unary {
            ($method:ident, $r:expr, $variant:ident) => {
                Answer::$variant(self.$method(Request::new($r)).await?.into_inner())
            };
        }
        let answer = match ask {
            Ask::Get(r) => unary!(kv_get, r, Get),
            Ask::Scan(r) => unary!(kv_scan, r, Scan),
            Ask::Prewrite(r) => unary!(kv_prewrite, r, Prewrite),
            Ask::Commit(r) => unary!(kv_commit, r, Commit),
            Ask::Cleanup(r) => unary!(kv_cleanup, r, Cleanup),
            Ask::BatchGet(r) => unary!(kv_batch_get, r, BatchGet),
            Ask::BatchRollback(r) => unary!(kv_batch_rollback, r, BatchRollback),
            Ask::ScanLock(r) => unary!(kv_scan_lock, r, ScanLock),
            Ask::ResolveLock(r) => unary!(kv_resolve_lock, r, ResolveLock),
            Ask::Gc(r) => unary!(kv_gc, r, Gc),
            Ask::DeleteRange(r) => unary!(kv_delete_range, r, DeleteRange),
            Ask::RawGet(r) => unary!(raw_get, r, RawGet),
            Ask::RawBatchGet(r) => unary!(raw_batch_get, r, RawBatchGet),
            Ask::RawPut(r) => unary!(raw_put, r, RawPut),
            Ask::RawBatchPut(r) => unary!(raw_batch_put, r, RawBatchPut),
            Ask::RawDelete(r) => unary!(raw_delete, r, RawDelete),
            Ask::RawBatchDelete(r) => unary!(raw_batch_delete, r, RawBatchDelete),
            Ask::RawScan(r) => unary!(raw_scan, r, RawScan),
            Ask::RawDeleteRange(r) => unary!(raw_delete_range, r, RawDeleteRange),
            Ask::RawBatchScan(r) => unary!(raw_batch_scan, r, RawBatchScan),
            Ask::PessimisticLock(r) => unary!(kv_pessimistic_lock, r, PessimisticLock),
            Ask::PessimisticRollback(r) => {
                unary!(kv_pessimistic_rollback, r, PessimisticRollback)
            }
            Ask::CheckTxnStatus(r) => unary!(kv_check_txn_status, r, CheckTxnStatus),
            Ask::TxnHeartBeat(r) => unary!(kv_txn_heart_beat, r, TxnHeartBeat),
            Ask::CheckSecondaryLocks(r) => {
                unary!(kv_check_secondary_locks, r, CheckSecondaryLocks)
            }
            Ask::Empty(r) => {
                let delay = Duration::from_millis(r.delay_time).min(MAX_EMPTY_DELAY);
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Answer::Empty(BatchCommandsEmptyResponse { test_id: r.test_id })
            }
        };
        Ok(batch_commands_response::Response { cmd: Some(answer) })
    }
}

/// The answer stream: each message takes whatever answers are ready (at least one), up to
/// `MAX_ANSWERS_PER_MESSAGE`. A failure is sent after the answers gathered before it, and ends
/// the stream.
fn answers(
    rx: mpsc::Receiver<Answered>,
) -> impl Stream<Item = Result<BatchCommandsResponse, Status>> + Send {
    struct State {
        rx: mpsc::Receiver<Answered>,
        failure: Option<Status>,
        done: bool,
    }
    let state = State {
        rx,
        failure: None,
        done: false,
    };
    futures::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        if let Some(status) = s.failure.take() {
            s.done = true;
            return Some((Err(status), s));
        }
        let mut msg = BatchCommandsResponse::default();
        let mut next = s.rx.recv().await;
        loop {
            match next {
                Some(Ok((id, answer))) => {
                    msg.request_ids.push(id);
                    msg.responses.push(answer);
                }
                Some(Err(status)) => {
                    s.failure = Some(status);
                    break;
                }
                // Every request answered and the reader gone: the stream is over.
                None => {
                    s.done = true;
                    break;
                }
            }
            if msg.responses.len() >= MAX_ANSWERS_PER_MESSAGE {
                break;
            }
            match s.rx.try_recv() {
                Ok(a) => next = Some(a),
                Err(_) => break,
            }
        }
        if msg.responses.is_empty() {
            return match s.failure.take() {
                Some(status) => {
                    s.done = true;
                    Some((Err(status), s))
                }
                None => None,
            };
        }
        count("response_messages", 1);
        Some((Ok(msg), s))
    })
}
