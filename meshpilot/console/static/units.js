// How the observing pages write numbers: as the API gave them where a user compares them with the
// API (counts, rates, milliseconds), rounded only where the API gives a raw share or microseconds.

export function percent(share) {
  if (share === null || share === undefined) return "—";
  return (Math.round(share * 10000) / 100) + " %";
}

export function ms(value) {
  return value === null || value === undefined ? "—" : value + " ms";
}

// A span's or trace's duration from microseconds.
export function micros(us) {
  if (us === null || us === undefined) return "—";
  if (us < 1000) return us + " µs";
  if (us < 1000000) return (Math.round(us / 10) / 100) + " ms";
  return (Math.round(us / 10000) / 100) + " s";
}

// A time in unix seconds as the browser's local date and time.
export function when(unixSeconds) {
  if (!unixSeconds) return "—";
  return new Date(unixSeconds * 1000).toLocaleString();
}
