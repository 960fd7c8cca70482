import { task, taskRef } from "@capsule-run/sdk";

// Declared in main.py.
const shout = taskRef<[string], string>("shout");

export const headline = task({ name: "headline", ram: "64MB" }, async (title: string) => {
  const slug = title.toLowerCase().replace(/[^a-z0-9]+/g, "-");
  return { slug, loud: await shout(title) };
});
