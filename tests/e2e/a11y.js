// What the app's accessibility promise can be read from the page itself (tests/e2e/test_app.py evaluates it):
// every visible form control has a label, every button a name, every visible text a contrast of at least 4.5:1
// with the background it sits on (WCAG 2 AA), and nothing is wider than the window.
(() => {
  const problems = [];
  const visible = (e) => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== "hidden";
  for (const e of document.querySelectorAll("input, select, textarea")) {
    if (visible(e) && !(e.labels && e.labels.length) && !e.getAttribute("aria-label")) {
      problems.push(`unlabelled ${e.outerHTML.slice(0, 80)}`);
    }
  }
  for (const e of document.querySelectorAll("button")) {
    if (visible(e) && !(e.getAttribute("aria-label") || e.textContent.trim())) problems.push("button without a name");
  }
  const rgb = (text) => (text.match(/[\d.]+/g) || []).map(Number);
  const channel = (c) => {
    const v = c / 255;
    return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
  };
  const luminance = ([r, g, b]) => 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b);
  const background = (e) => {
    for (; e; e = e.parentElement) {
      const c = rgb(getComputedStyle(e).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] > 0.9)) return c;
    }
    return [255, 255, 255];
  };
  let checked = 0;
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const e = node.parentElement;
    if (!node.textContent.trim() || !visible(e) || e.closest(".sr-only, option")) continue;
    const l1 = luminance(rgb(getComputedStyle(e).color));
    const l2 = luminance(background(e));
    const ratio = (Math.max(l1, l2) + 0.05) / (Math.min(l1, l2) + 0.05);
    checked += 1;
    if (ratio < 4.5) problems.push(`contrast ${ratio.toFixed(2)} for "${node.textContent.trim().slice(0, 30)}"`);
  }
  const width = document.documentElement.scrollWidth;
  if (width > window.innerWidth) problems.push(`${width} px wide in a ${window.innerWidth} px window`);
  return { problems, checked };
})()
