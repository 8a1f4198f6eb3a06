//! The address the tree hands out for a worker.
//!
//! A [`ChildAddr`] exists from the moment the child is specified, before the tree starts, and
//! stays valid for the tree's life: it points at the child's [mailbox](crate::mailbox), not at
//! one actor instance. Every send either is accepted — then the message is handled, or counted as
//! dropped in the report — or fails at the sender with the message handed back.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use actix::dev::{MessageResponse, OneshotSender};
use actix::prelude::{Actor, Context, Handler, MailboxError, Message, SendError};

use crate::mailbox::{Job, Mailbox, Refused, Runnable};

/// The stable, counted address of a supervised worker of type `A`.
///
/// Obtain it from [`WorkerSpec::addr`](crate::WorkerSpec::addr) while building the tree (so
/// children can be given each other's addresses) or from
/// [`TreeHandle::addr`](crate::TreeHandle::addr) later.
///
/// ```
/// use actix::prelude::*;
/// use actix_supervisor::{ChildSpec, Worker};
///
/// struct Echo;
/// impl Actor for Echo { type Context = Context<Self>; }
/// impl Worker for Echo {}
///
/// #[derive(Message)]
/// #[rtype(result = "u32")]
/// struct Double(u32);
/// impl Handler<Double> for Echo {
///     type Result = u32;
///     fn handle(&mut self, m: Double, _: &mut Context<Self>) -> u32 { m.0 * 2 }
/// }
///
/// let spec = ChildSpec::worker("echo", || Echo);
/// let echo = spec.addr();
/// // Accepted before the tree even starts; handled once it has.
/// echo.do_send(Double(21)).unwrap();
/// ```
pub struct ChildAddr<A: Actor<Context = Context<A>>> {
    mailbox: Arc<Mailbox<A>>,
}

impl<A: Actor<Context = Context<A>>> Clone for ChildAddr<A> {
    fn clone(&self) -> Self {
        ChildAddr {
            mailbox: self.mailbox.clone(),
        }
    }
}

impl<A: Actor<Context = Context<A>>> fmt::Debug for ChildAddr<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildAddr")
            .field("actor", &std::any::type_name::<A>())
            .field("closed", &self.mailbox.is_closed())
            .finish()
    }
}

impl<A: Actor<Context = Context<A>>> ChildAddr<A> {
    pub(crate) fn new(mailbox: Arc<Mailbox<A>>) -> Self {
        ChildAddr { mailbox }
    }

    /// Sends a message without waiting for the result, ignoring the mailbox capacity (as actix's
    /// `do_send` does). Fails with [`SendError::Closed`] once the child has acknowledged its
    /// `Stopping`, or is gone for good.
    pub fn do_send<M>(&self, msg: M) -> Result<(), SendError<M>>
    where
        A: Handler<M>,
        M: Message + Send + 'static,
        M::Result: Send,
    {
        self.push(msg, None, false).map_err(|(m, _)| m)
    }

    /// Sends a message without waiting, failing with [`SendError::Full`] when a bounded mailbox
    /// is full and [`SendError::Closed`] when the child no longer accepts messages.
    pub fn try_send<M>(&self, msg: M) -> Result<(), SendError<M>>
    where
        A: Handler<M>,
        M: Message + Send + 'static,
        M::Result: Send,
    {
        self.push(msg, None, true).map_err(|(m, _)| m)
    }

    /// Sends a message and waits for the handler's result. On a bounded mailbox it first waits
    /// for room. Fails with [`MailboxError::Closed`] when the message is refused, or when it was
    /// accepted but dropped unhandled because the child was aborted.
    ///
    /// The message enters the mailbox when the future is first polled (on a full bounded
    /// mailbox, once there is room: a future dropped while it waits for room never sent its
    /// message). Once it has entered, it is handled even if the future is dropped before the
    /// answer comes (unlike actix's `send`, which then skips the handler): an accepted message is
    /// handled or counted as dropped, never silently skipped.
    pub async fn send<M>(&self, msg: M) -> Result<M::Result, MailboxError>
    where
        A: Handler<M>,
        M: Message + Send + 'static,
        M::Result: Send,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut msg = msg;
        let mut tx = tx;
        loop {
            match self.push(msg, Some(tx), true) {
                Ok(()) => break,
                Err((SendError::Full(m), t)) => {
                    msg = m;
                    tx = t.ok_or(MailboxError::Closed)?;
                    self.mailbox.wait_for_room().await;
                }
                Err((SendError::Closed(_), _)) => return Err(MailboxError::Closed),
            }
        }
        rx.await.map_err(|_| MailboxError::Closed)
    }

    /// Puts a message in the mailbox now and returns a future of the handler's result.
    ///
    /// Unlike [`send`](Self::send), whose message enters the mailbox only when the future is
    /// first polled, the message is queued before this returns — so it keeps its place among
    /// other messages sent after it (with `do_send` or `request`), and the caller can go on and
    /// await the answer later. Like `do_send` it ignores the mailbox capacity. Fails at once with
    /// [`SendError::Closed`] when the child no longer accepts messages; the future fails with
    /// [`MailboxError::Closed`] when the message was accepted but dropped unhandled (the child
    /// was aborted). The message is handled whether or not the future is awaited or kept: a
    /// caller may queue a request and drop its answer (a connection closing behind its last
    /// requests), and the request still takes effect, in its place among the others.
    pub fn request<M>(
        &self,
        msg: M,
    ) -> Result<impl Future<Output = Result<M::Result, MailboxError>> + 'static, SendError<M>>
    where
        A: Handler<M>,
        M: Message + Send + 'static,
        M::Result: Send,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.push(msg, Some(tx), false).map_err(|(m, _)| m)?;
        Ok(async move { rx.await.map_err(|_| MailboxError::Closed) })
    }

    /// True while the child accepts messages.
    pub fn connected(&self) -> bool {
        !self.mailbox.is_closed()
    }

    #[allow(clippy::type_complexity)]
    fn push<M>(
        &self,
        msg: M,
        tx: Option<OneshotSender<M::Result>>,
        respect_capacity: bool,
    ) -> Result<(), (SendError<M>, Option<OneshotSender<M::Result>>)>
    where
        A: Handler<M>,
        M: Message + Send + 'static,
        M::Result: Send,
    {
        let job: Job<A> = Box::new(MessageJob { msg, tx });
        self.mailbox.push(job, respect_capacity).map_err(|refused| {
            let (job, wrap): (Job<A>, fn(M) -> SendError<M>) = match refused {
                Refused::Closed(job) => (job, SendError::Closed),
                Refused::Full(job) => (job, SendError::Full),
            };
            match job.into_any().downcast::<MessageJob<M>>() {
                Ok(job) => (wrap(job.msg), job.tx),
                // The box was made just above with exactly this type.
                Err(_) => unreachable!("a refused job is the one that was pushed"),
            }
        })
    }
}

/// A user message and, for `send`, where its result goes.
struct MessageJob<M: Message> {
    msg: M,
    tx: Option<OneshotSender<M::Result>>,
}

impl<A, M> Runnable<A> for MessageJob<M>
where
    A: Actor<Context = Context<A>> + Handler<M>,
    M: Message + Send + 'static,
    M::Result: Send,
{
    fn run(self: Box<Self>, act: &mut A, ctx: &mut Context<A>) {
        let MessageJob { msg, tx } = *self;
        // Handled even when the caller no longer waits for the result: it was accepted, and
        // the sender may have relied on its effect (and on its order among later messages).
        <A as Handler<M>>::handle(act, msg, ctx).handle(ctx, tx);
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}
