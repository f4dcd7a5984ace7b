// A line diff (longest common subsequence) for "Preview": what applying would change in the
// stored policy. Policies are a few hundred lines at most; past LIMIT lines each side the whole
// text is shown as replaced rather than spending quadratic time.

const LIMIT = 3000;

// [{op: "same" | "del" | "add", line}]
export function lineDiff(before, after) {
  const a = before.replace(/\n$/, "").split("\n");
  const b = after.replace(/\n$/, "").split("\n");
  if (a.length > LIMIT || b.length > LIMIT) {
    return [...a.map((line) => ({ op: "del", line })), ...b.map((line) => ({ op: "add", line }))];
  }
  const n = a.length, m = b.length;
  const lcs = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  const out = [];
  let i = 0, j = 0;
  while (i < n && j < m) {
    if (a[i] === b[j]) { out.push({ op: "same", line: a[i] }); i++; j++; }
    else if (lcs[i + 1][j] >= lcs[i][j + 1]) { out.push({ op: "del", line: a[i] }); i++; }
    else { out.push({ op: "add", line: b[j] }); j++; }
  }
  while (i < n) out.push({ op: "del", line: a[i++] });
  while (j < m) out.push({ op: "add", line: b[j++] });
  return out;
}
