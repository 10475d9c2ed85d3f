//! Intake's message handlers: each calls one of Intake's methods, then plans the next step
//! if none is in flight (`pump`), which also stops Intake once it is closing and idle.

use actix::{Context, Handler, ResponseFuture};

use super::Intake;
use crate::actors::admission::Admitted;
use crate::actors::messages::{
    Cancel, DraftPoolUsage, EndReason, Ended, ExecutorStopped, GetKvStats, GetStats, HandlesGone, RuntimeStats,
    Shutdown, StepDone, Submit,
};

impl Handler<Submit> for Intake {
    type Result = ();

    fn handle(&mut self, s: Submit, ctx: &mut Context<Self>) {
        self.submit(s, ctx);
        self.pump(ctx);
    }
}

impl Handler<Admitted> for Intake {
    type Result = ();

    fn handle(&mut self, a: Admitted, ctx: &mut Context<Self>) {
        self.admitted(a.submit, a.result);
        self.admission_finished(ctx);
        self.pump(ctx);
    }
}

impl Handler<Cancel> for Intake {
    type Result = ();

    fn handle(&mut self, Cancel(id): Cancel, ctx: &mut Context<Self>) {
        self.end(id, EndReason::Cancelled);
        self.pump(ctx);
    }
}

impl Handler<Ended> for Intake {
    type Result = ();

    fn handle(&mut self, Ended { id, caller_gone }: Ended, ctx: &mut Context<Self>) {
        match caller_gone {
            true => self.end(id, EndReason::Cancelled),
            false => self.abort(id), // a stop string: the Streamer has ended it already
        }
        self.pump(ctx);
    }
}

impl Handler<StepDone> for Intake {
    type Result = ();

    fn handle(&mut self, done: StepDone, ctx: &mut Context<Self>) {
        self.step_done(done);
        self.pump(ctx);
    }
}

impl Handler<ExecutorStopped> for Intake {
    type Result = ();

    fn handle(&mut self, _: ExecutorStopped, ctx: &mut Context<Self>) {
        self.executor_stopped();
        self.pump(ctx);
    }
}

impl Handler<DraftPoolUsage> for Intake {
    type Result = ();

    fn handle(&mut self, DraftPoolUsage(usage): DraftPoolUsage, _: &mut Context<Self>) {
        self.set_draft_pool(usage);
    }
}

impl Handler<GetStats> for Intake {
    type Result = ResponseFuture<RuntimeStats>;

    fn handle(&mut self, _: GetStats, _: &mut Context<Self>) -> Self::Result {
        let mut stats = self.stats();
        let kv = self.kv();
        Box::pin(async move {
            stats.kv.target = kv.send(GetKvStats).await.unwrap_or_default();
            stats
        })
    }
}

impl Handler<Shutdown> for Intake {
    type Result = ();

    /// Requests submitted before the shutdown were handled before it: they are taken.
    fn handle(&mut self, Shutdown { drain, done }: Shutdown, ctx: &mut Context<Self>) {
        self.close(Some(done));
        self.drain_for(drain, ctx);
        self.pump(ctx);
    }
}

impl Handler<HandlesGone> for Intake {
    type Result = ();

    fn handle(&mut self, _: HandlesGone, ctx: &mut Context<Self>) {
        self.handles_gone();
        self.pump(ctx);
    }
}
