// Actors blocked in receive, for measuring what an idle JS actor costs the host
// (as idle_actors.py): main sleeps, starts the actors, and sleeps again.
import { task, receive, sleep } from "@capsule-run/sdk";

export const idle = task({ name: "idle", compute: "LOW" }, async () => {
  await receive();
});

export const main = task({ name: "main", compute: "HIGH", timeout: "10m" }, async (actors = "50", pause = "2") => {
  await sleep(Number(pause));
  const handles = Array.from({ length: Number(actors) }, () => idle.spawn());
  await sleep(Number(pause));
  return handles.length;
});
