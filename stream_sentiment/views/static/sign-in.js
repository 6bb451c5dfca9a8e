// Opening the page from a script: /alerts#token=<token> signs in with the token in the URL's fragment, which
// the browser never sends to any server (no access log, no proxy, no Referer sees it). It is dropped from
// the address bar and the history before anything else, then posted once, like the form below; a wrong token
// comes back to this form with its message and no fragment, so nothing loops.
// `stream-sentiment alerts --page-url` prints such a URL.
"use strict";

const token = new URLSearchParams(location.hash.slice(1)).get("token");
if (token) {
  history.replaceState(null, "", location.pathname + location.search);
  document.getElementById("token").value = token;
  document.getElementById("sign-in").submit();
}
