// A task calls a trivial child N times in a row; per-call times measured in the
// guest (performance.now is the host's monotonic clock).
import { task } from "@capsule-run/sdk";

export const child = task({ name: "child", compute: "LOW" }, (i: number) => i);

export const main = task({ name: "main", compute: "HIGH", timeout: "5m" }, async (n = "200") => {
  const times: number[] = [];
  for (let i = 0; i < Number(n); i++) {
    const start = performance.now();
    await child(i);
    times.push(performance.now() - start);
  }
  times.sort((a, b) => a - b);
  return {
    calls: times.length,
    p50_ms: times[Math.floor(times.length / 2)],
    p95_ms: times[Math.floor(times.length * 0.95)],
  };
});
