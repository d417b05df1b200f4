// pbxgate pages: passkeys (WebAuthn) on top of forms that work without script.
"use strict";
(function () {
  const page = document.body.dataset.page;
  const $ = (id) => document.getElementById(id);
  // The page's words, in its language (data-* of #messages).
  const words = ($("messages") || { dataset: {} }).dataset;

  function say(message, kind) {
    const el = $("status");
    if (!el) return;
    el.textContent = message;
    el.className = "notice " + (kind || "info");
    el.hidden = false;
  }

  async function post(url, body) {
    const response = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "content-type": "application/json", accept: "application/json" },
      body: JSON.stringify(body || {}),
    });
    let data = {};
    try { data = await response.json(); } catch (e) { /* not JSON */ }
    if (!response.ok) {
      const error = new Error(data.message || words.failed);
      error.code = data.error;
      throw error;
    }
    return data;
  }

  const hasPasskeys = !!(window.PublicKeyCredential && navigator.credentials);
  const b64u = {
    encode(buffer) {
      let s = "";
      for (const b of new Uint8Array(buffer)) s += String.fromCharCode(b);
      return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
    },
    decode(text) {
      const s = atob(text.replace(/-/g, "+").replace(/_/g, "/"));
      return Uint8Array.from(s, (c) => c.charCodeAt(0)).buffer;
    },
  };

  // Browsers since 2024 parse and serialise WebAuthn JSON themselves; older ones get a fallback.
  function requestOptions(json) {
    if (PublicKeyCredential.parseRequestOptionsFromJSON) return PublicKeyCredential.parseRequestOptionsFromJSON(json);
    const o = Object.assign({}, json, { challenge: b64u.decode(json.challenge) });
    if (json.allowCredentials) o.allowCredentials = json.allowCredentials.map((c) => Object.assign({}, c, { id: b64u.decode(c.id) }));
    return o;
  }
  function creationOptions(json) {
    if (PublicKeyCredential.parseCreationOptionsFromJSON) return PublicKeyCredential.parseCreationOptionsFromJSON(json);
    const o = Object.assign({}, json, { challenge: b64u.decode(json.challenge) });
    o.user = Object.assign({}, json.user, { id: b64u.decode(json.user.id) });
    if (json.excludeCredentials) o.excludeCredentials = json.excludeCredentials.map((c) => Object.assign({}, c, { id: b64u.decode(c.id) }));
    return o;
  }
  function credentialJSON(cred) {
    if (cred.toJSON) return cred.toJSON();
    const r = cred.response, out = { id: cred.id, rawId: b64u.encode(cred.rawId), type: cred.type, extensions: {} };
    out.response = { clientDataJSON: b64u.encode(r.clientDataJSON) };
    if (r.attestationObject) out.response.attestationObject = b64u.encode(r.attestationObject);
    if (r.authenticatorData) out.response.authenticatorData = b64u.encode(r.authenticatorData);
    if (r.signature) out.response.signature = b64u.encode(r.signature);
    if (r.userHandle) out.response.userHandle = b64u.encode(r.userHandle);
    return out;
  }

  async function signInWithPasskey(login, conditional, signal) {
    const start = await post("/.pbxgate/api/passkey/login/start", login ? { login } : {});
    const options = { publicKey: requestOptions(start.publicKey) };
    if (conditional) {
      options.mediation = "conditional";
      options.signal = signal;
    }
    const credential = await navigator.credentials.get(options);
    if (!credential) throw new Error(words.noneChosen);
    const done = await post("/.pbxgate/api/passkey/login/finish", {
      ceremony: start.ceremony,
      credential: credentialJSON(credential),
      rd: ($("rd") || {}).value || "/",
    });
    location.assign(done.redirect);
  }

  async function createPasskey(name) {
    const start = await post("/.pbxgate/api/passkey/register/start", {});
    const credential = await navigator.credentials.create({ publicKey: creationOptions(start.publicKey) });
    return post("/.pbxgate/api/passkey/register/finish", {
      ceremony: start.ceremony,
      credential: credentialJSON(credential),
      name,
    });
  }

  // Destructive admin actions (revoke, delete, reset, sign out everywhere)
  // ask first.
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }

  function explain(error) {
    // Browsers report a key that cannot be a passkey here (no resident key,
    // no user verification: a U2F-only key, a key without a PIN) as they
    // report a cancelled request, so the message names both.
    if (error && error.name === "NotAllowedError") return `${words.cancelled} ${words.unusable}`;
    if (error && error.name === "InvalidStateError") return words.alreadyRegistered;
    if (error && (error.name === "NotSupportedError" || error.name === "ConstraintError")) return words.unusable;
    if (error && error.name === "AbortError") return null;
    return (error && error.message) || words.failed;
  }

  if (page === "login" && hasPasskeys) {
    const button = $("passkey-button");
    const field = $("login");
    button.hidden = false;
    let autofill = null;
    // Autofill (conditional UI): offered when the name field is focused.
    const startAutofill = async () => {
      if (autofill || !PublicKeyCredential.isConditionalMediationAvailable) return;
      if (!(await PublicKeyCredential.isConditionalMediationAvailable())) return;
      autofill = new AbortController();
      signInWithPasskey(null, true, autofill.signal).catch((e) => {
        const m = explain(e);
        if (m) say(m, "error");
        autofill = null;
      });
    };
    field.addEventListener("focus", startAutofill, { once: true });
    button.addEventListener("click", () => {
      if (autofill) { autofill.abort(); autofill = null; }
      button.disabled = true;
      signInWithPasskey(field.value.trim() || null, false).catch((e) => {
        const m = explain(e);
        if (m) say(m, "error");
        button.disabled = false;
      });
    });
  }

  if (page === "link") {
    const form = $("link-form");
    if (form) form.submit();
  }

  const register = $("register-form");
  if (register) {
    if (!hasPasskeys) {
      say(words.unsupported, "error");
    } else {
      register.addEventListener("submit", (event) => {
        event.preventDefault();
        const button = $("register-button");
        button.disabled = true;
        createPasskey($("device").value.trim())
          .then(() => location.assign(register.dataset.rd || "/"))
          .catch((e) => {
            say(explain(e) || words.stopped, "error");
            button.disabled = false;
          });
      });
    }
  }

  if (page === "unlock") {
    const unlock = $("unlock-form");
    const minutes = $("minutes");
    const mirror = $("password-minutes");
    if (mirror) minutes.addEventListener("change", () => { mirror.value = minutes.value; });
    unlock.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = $("unlock-button");
      button.disabled = true;
      try {
        const start = await post("/.pbxgate/api/unlock/start", {});
        const credential = await navigator.credentials.get({ publicKey: requestOptions(start.publicKey) });
        const done = await post("/.pbxgate/api/unlock/finish", {
          ceremony: start.ceremony,
          credential: credentialJSON(credential),
          minutes: Number(minutes.value),
          rd: unlock.dataset.rd || "/",
        });
        location.assign(done.redirect);
      } catch (e) {
        say(explain(e) || words.stopped, "error");
        button.disabled = false;
      }
    });
  }

  if (page === "account") {
    for (const item of document.querySelectorAll("#passkeys li[data-id]")) {
      const id = item.dataset.id;
      item.querySelector(".rename").addEventListener("click", () => {
        const name = prompt(words.renamePrompt, item.querySelector(".name").textContent);
        if (name) post("/.pbxgate/api/passkeys/rename", { id, name }).then(() => location.reload(), (e) => say(explain(e), "error"));
      });
      item.querySelector(".delete").addEventListener("click", () => {
        if (confirm(words.deleteConfirm)) {
          post("/.pbxgate/api/passkeys/delete", { id }).then(() => location.reload(), (e) => say(explain(e), "error"));
        }
      });
    }
  }
})();
