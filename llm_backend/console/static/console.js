// llm-backend console: progressive enhancement only (every page works without it).
// Copy buttons, confirmation of destructive forms, the custom range fields of the range picker.
"use strict";
document.addEventListener("click", async (event) => {
  const button = event.target.closest("[data-copy]");
  if (!button) return;
  const source = document.querySelector(button.dataset.copy);
  const note = button.parentElement.querySelector(".copied");
  const text = source ? source.textContent.trim() : "";
  try {
    await navigator.clipboard.writeText(text);
    if (note) note.textContent = "Copied.";
  } catch (err) {
    const range = document.createRange();
    range.selectNodeContents(source);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    if (note) note.textContent = "Selected: press Ctrl+C (⌘C) to copy.";
  }
});
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) event.preventDefault();
});
function syncRange() {
  const select = document.querySelector("select[name=range]");
  if (!select) return;
  const custom = select.value === "custom";
  document.querySelectorAll(".custom-range").forEach((el) => { el.hidden = !custom; });
}
document.addEventListener("change", (event) => { if (event.target.matches("select[name=range]")) syncRange(); });
document.addEventListener("DOMContentLoaded", syncRange);
