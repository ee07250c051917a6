// fedvault console: progressive enhancement only; every form works without this file.
// The verification form posts in the background and swaps in the result panel, so the
// filtered table stays where it is. Any non-2xx answer falls back to a normal submit,
// which shows the server's error page.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const form = document.querySelector("form[data-enhance='verify']");
  if (!form) return;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button");
    const label = button.textContent;
    button.disabled = true;
    button.textContent = "Verifying…";
    try {
      const response = await fetch(form.action, {
        method: "POST",
        body: new URLSearchParams(new FormData(form)),
        headers: { "X-Console-Fragment": "verify" },
        credentials: "same-origin",
      });
      if (!response.ok) {
        form.submit();
        return;
      }
      const target = document.getElementById("verify-result");
      target.outerHTML = await response.text();
    } catch (_) {
      form.submit();
    } finally {
      button.disabled = false;
      button.textContent = label;
    }
  });
});
