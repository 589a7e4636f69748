// Compiled by `npm run typecheck` (tsc --noEmit): the published types describe
// a real use of the package. Not run.
import { Meterd, MeterdError, Webhook, type CheckResult, type Reservation } from "meterd";

async function interview(meterd: Meterd): Promise<number> {
  const ok: CheckResult = await meterd.check({ customer: "u_42", meter: "interviews" });
  if (!ok.allowed) return ok.remaining ?? 0;
  const hold = await meterd.reserve({ id: "iv-1", customer: "u_42", meter: "interview_minutes", quantity: 60, expiresIn: "2h" });
  const done: Reservation = await meterd.settle(hold.reservation.id, { quantity: 42.5 });
  void meterd.track({ customer: "u_42", meter: "interviews" });
  await meterd.close();
  try {
    await meterd.consume({ customer: "u_42", meter: "interviews" });
  } catch (e) {
    if (e instanceof MeterdError && e.code === "invalid_request") return e.status;
  }
  const payload: unknown = await new Webhook("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").verify("{}", { "webhook-id": "x" });
  void payload;
  return done.settled_quantity ?? 0;
}
void interview(new Meterd({ baseUrl: "http://127.0.0.1:8480", onFull: "block", batchSize: 500 }));
