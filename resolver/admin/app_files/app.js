// The subscriber's app: one page over the admin API, with the site token in the Authorization header only.
// The sign-in link carries the token in the fragment (#token=site.…), which no browser sends to a server or puts
// in a Referer; it is kept in sessionStorage and taken out of the address bar at once. Nothing is ever put in a
// cookie, so another site cannot make this browser act with the token (no CSRF). Every text from the network
// (device names, alert names) goes into the page as text, never as HTML.
"use strict";

const DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const DAY_NAMES = { mon: "Mon", tue: "Tue", wed: "Wed", thu: "Thu", fri: "Fri", sat: "Sat", sun: "Sun" };
const REASONS = {
  malware: "Malware",
  phishing: "Phishing",
  dga: "Machine-made name",
  tunnel: "Data hidden in DNS",
  bypass: "Tried to bypass the filter",
};
const TOKEN_KEY = "bns.site-token";
const MORNING = 7 * 60; // "until tomorrow": the next 07:00 on the network's clock

const state = {
  token: null,
  site: null, // its id, from the token
  expires: 0,
  doc: null, // GET /v1/sites/{site}
  categories: [],
  devices: null, // GET /v1/sites/{site}/devices: {"devices": [...]}; null until it answers
  devicesError: null,
  status: null, // GET /v1/sites/{site}/status: what applies now to the site, each group and device
  statusError: null,
  tab: "devices",
  rulesTarget: null, // {kind, id, name}
  dialogDevice: null, // the device shown in the dialog: {key, device}
  activityDevice: "", // the key whose activity is shown; "": the whole network
};

const $ = (selector) => document.querySelector(selector);

function h(tag, attributes, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") element.className = value;
    else if (name === "text") element.textContent = value;
    else if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (value === true) element.setAttribute(name, "");
    else element.setAttribute(name, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

function say(message, isError) {
  const notice = $("#notice");
  notice.textContent = message;
  notice.classList.toggle("bad", Boolean(isError));
}

// --- the credential ------------------------------------------------------------------------------------------

function claimsOf(token) {
  // site.<base64url JSON {site, expires}>.<mac>: the payload is read here only to know which site to show; the
  // server checks the signature on every call.
  const parts = String(token).split(".");
  if (parts.length !== 3 || parts[0] !== "site") return null;
  try {
    const claims = JSON.parse(atob(parts[1].replace(/-/g, "+").replace(/_/g, "/")));
    if (typeof claims.site !== "string" || typeof claims.expires !== "number") return null;
    return claims;
  } catch (_error) {
    return null;
  }
}

function tokenFromText(text) {
  const found = String(text).trim().match(/(?:#token=)?(site\.[A-Za-z0-9_=-]+\.[A-Za-z0-9_=-]+)/);
  return found ? decodeURIComponent(found[1]) : null;
}

function takeTokenFromAddress() {
  if (!location.hash.startsWith("#token=")) return;
  const token = tokenFromText(location.hash);
  history.replaceState(null, "", location.pathname + location.search); // out of the address bar and history
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
}

function signIn(token, quiet) {
  const claims = claimsOf(token);
  if (!claims) return showLogin("That is not a sign-in link of this network.");
  if (claims.expires * 1000 <= Date.now()) return showLogin("This sign-in link has expired. Ask for a new one.");
  state.token = token;
  state.site = claims.site;
  state.expires = claims.expires;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("#login").hidden = true;
  $("#tabs").hidden = false;
  $("#foot").hidden = false;
  $("#signed-in").textContent = `Signed in until ${new Date(claims.expires * 1000).toLocaleDateString()}.`;
  if (!quiet) say("");
  // Busy until the first load is shown: assistive technology (and the tests) wait for it.
  document.body.setAttribute("aria-busy", "true");
  return loadAll()
    .then(() => showTab(state.tab))
    .finally(() => document.body.removeAttribute("aria-busy"));
}

function showLogin(reason) {
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  for (const view of document.querySelectorAll(".view")) view.hidden = true;
  $("#tabs").hidden = true;
  $("#foot").hidden = true;
  $("#site-name").textContent = "Your network";
  $("#login").hidden = false;
  if (reason) $("#login-reason").textContent = reason;
}

// --- the API -------------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.token}`, Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit", // never a cookie, either way
      cache: "no-store",
      referrerPolicy: "no-referrer",
    });
  } catch (_error) {
    throw new ApiError(0, "The network's server cannot be reached. Try again in a moment.");
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_error) {
    data = null;
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    if (response.status === 401) {
      showLogin("Your sign-in link is no longer valid. Ask for a new one.");
    }
    throw new ApiError(response.status, error.message || `The server answered ${response.status}.`, error.field);
  }
  return data;
}

const sitePath = (suffix) => `/v1/sites/${encodeURIComponent(state.site)}${suffix || ""}`;

function targetPath(kind, id) {
  if (kind === "group") return sitePath(`/groups/${encodeURIComponent(id)}`);
  if (kind === "device") return sitePath(`/devices/${encodeURIComponent(id)}`);
  return sitePath();
}

async function loadAll() {
  try {
    const [doc, categories] = await Promise.all([api("GET", sitePath()), api("GET", "/v1/categories")]);
    state.doc = doc;
    state.categories = categories;
  } catch (error) {
    if (error.status !== 401) say(error.message, true);
    return;
  }
  $("#site-name").textContent = state.doc.name || "Your network";
  document.title = `${state.doc.name || "Your network"}: devices and rules`;
  await loadLive();
}

async function loadLive() {
  // What changes with every write and with the clock: the devices and what applies to each, as the server
  // works it out. The page works out none of it.
  await Promise.all([loadDevices(), loadStatus()]);
}

async function loadDevices() {
  try {
    state.devices = (await api("GET", sitePath("/devices"))).devices;
    state.devicesError = null;
  } catch (error) {
    state.devices = null;
    state.devicesError = error.message;
  }
}

async function loadStatus() {
  try {
    state.status = await api("GET", sitePath("/status"));
    state.statusError = null;
  } catch (error) {
    state.status = null;
    state.statusError = error.message;
  }
}

function written(doc) {
  // A write answers with the whole site document as it left it.
  if (doc && doc.id) state.doc = doc;
}

// --- time on the network's clock -----------------------------------------------------------------------------

function zone() {
  return (state.doc && state.doc.timezone) || "UTC";
}

function zoneParts(ms) {
  const format = new Intl.DateTimeFormat("en-GB", {
    timeZone: zone(),
    hourCycle: "h23",
    year: "numeric",
    month: "2-digit",
    day: "2-digit",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
  });
  const parts = {};
  for (const part of format.formatToParts(new Date(ms))) parts[part.type] = part.value;
  return {
    year: Number(parts.year),
    month: Number(parts.month),
    day: Number(parts.day),
    hour: Number(parts.hour),
    minute: Number(parts.minute),
    second: Number(parts.second),
  };
}

function wallClockToMs(year, month, day, minutes) {
  // The instant the network's clock reads that date and time (twice corrected, for DST days).
  const wall = Date.UTC(year, month - 1, day, Math.floor(minutes / 60), minutes % 60);
  const offset = (ms) => {
    const p = zoneParts(ms);
    return Date.UTC(p.year, p.month - 1, p.day, p.hour, p.minute, p.second) - Math.floor(ms / 1000) * 1000;
  };
  const first = wall - offset(wall);
  return wall - offset(first);
}

function nextMorning(now) {
  const today = zoneParts(now);
  let at = wallClockToMs(today.year, today.month, today.day, MORNING);
  if (at <= now) {
    const tomorrow = new Date(Date.UTC(today.year, today.month - 1, today.day + 1));
    at = wallClockToMs(tomorrow.getUTCFullYear(), tomorrow.getUTCMonth() + 1, tomorrow.getUTCDate(), MORNING);
  }
  return at;
}

function clock(ms, withDay) {
  const options = { timeZone: zone(), hour: "numeric", minute: "2-digit" };
  if (withDay) options.weekday = "short";
  return new Intl.DateTimeFormat(undefined, options).format(new Date(ms));
}

function whenText(ms) {
  const sameDay = zoneParts(ms).day === zoneParts(Date.now()).day && Math.abs(ms - Date.now()) < 86400000;
  return clock(ms, !sameDay);
}

function untilText(until) {
  // An end as the server gives it: an RFC 3339 time, or "forever".
  return until === "forever" ? "until resumed" : `until ${whenText(Date.parse(until))}`;
}

// --- what applies now, as the server says --------------------------------------------------------------------

function groupOf(groupId) {
  return groupId && state.doc.groups ? state.doc.groups[groupId] : null;
}

function groupName(groupId) {
  const group = groupOf(groupId);
  return group ? group.name || groupId : groupId;
}

function statusFor(kind, id) {
  // The server's status of the site, a group or a configured device (GET /v1/sites/{site}/status); null when
  // it could not be had.
  if (!state.status) return null;
  if (kind === "site") return state.status.site;
  return (kind === "group" ? state.status.groups : state.status.devices)[id] || null;
}

const LEVELS = {
  device: "its own rules",
  group: "its group's rules",
  subscriber: "the network's rules",
  default: "the default rules",
};

function rulesText(status) {
  // Whose rules govern, as the server says, and the profile they start from.
  if (!status) return "rules not known now";
  return `${LEVELS[status.level]}${status.profile ? ` (profile ${status.profile})` : ""}`;
}

function statusBadge(status, kind) {
  // A status in words: the pause or the schedule that decides it, and until when.
  if (!status) return h("span", { class: "badge", text: state.statusError ? "Status unknown" : "…" });
  let shown = { kind: "ok", text: "Internet on" };
  if (status.state === "paused") {
    const level = status.pause.level;
    const where =
      level === "group" && kind !== "group"
        ? ` (group ${groupName(status.group)})`
        : level === "subscriber" && kind !== "site"
          ? " (whole network)"
          : "";
    shown = { kind: "paused", text: `Paused ${untilText(status.until)}${where}` };
  } else if (status.state === "scheduled") {
    shown = { kind: "schedule", text: `${status.schedule.name}: everything blocked ${untilText(status.until)}` };
  } else if (status.schedules.length) {
    const running = status.schedules[0];
    shown = { kind: "schedule", text: `${running.name}: some sites blocked ${untilText(running.until)}` };
  }
  const facts = { "data-state": status.state, "data-until": status.until }; // the server's own values, kept
  return h("span", { class: `badge ${shown.kind}`, ...facts, text: shown.text });
}

// --- pausing -------------------------------------------------------------------------------------------------

const PAUSES = [
  { id: "30", label: "30 min", long: "for 30 minutes", body: () => ({ minutes: 30 }) },
  { id: "60", label: "1 hour", long: "for 1 hour", body: () => ({ minutes: 60 }) },
  {
    id: "morning",
    label: () => `Until ${clock(nextMorning(Date.now()))}`,
    long: () => `until ${clock(nextMorning(Date.now()))}`,
    body: () => ({ until: new Date(nextMorning(Date.now())).toISOString().replace(/\.\d+Z$/, "Z") }),
  },
  { id: "forever", label: "Until I resume", long: "until resumed", body: () => ({ until: "forever" }) },
];

const OWN_PAUSE = { site: "subscriber", group: "group", device: "device" };

function pauseControls(kind, id, name) {
  const status = statusFor(kind, id);
  const pausedHere = Boolean(status && status.pause && status.pause.level === OWN_PAUSE[kind]);
  const text = (value) => (typeof value === "function" ? value() : value);
  const buttons = PAUSES.map((pause) =>
    h("button", {
      type: "button",
      class: "pause-button",
      "data-pause": pause.id,
      "aria-label": `Pause ${name}: ${text(pause.label)}`, // the visible words first (WCAG 2.5.3)
      text: text(pause.label),
      onclick: () => act(kind, id, "pause", pause.body(), `${name} is paused ${text(pause.long)}.`),
    }),
  );
  return h(
    "div",
    { class: "pause", role: "group", "aria-label": `Pause ${name}` },
    h("p", { class: "pause-state" }, statusBadge(status, kind)),
    h("p", { class: "pause-title", text: "Pause the internet:" }),
    h("div", { class: "pause-buttons" }, buttons),
    pausedHere
      ? h("button", {
          type: "button",
          class: "primary resume",
          "data-unpause": "",
          "aria-label": `Resume now: ${name}`,
          text: "Resume now",
          onclick: () => act(kind, id, "unpause", undefined, `${name} is back on the internet.`),
        })
      : null,
  );
}

async function act(kind, id, action, body, done) {
  const holder = document.activeElement && document.activeElement.closest("#device-dialog, [data-group], [data-site]");
  try {
    written(await api("POST", `${targetPath(kind, id)}/${action}`, body === undefined ? {} : body));
    say(done);
  } catch (error) {
    say(error.message, true);
  }
  await loadLive();
  await render();
  // The pressed button was drawn again: the focus goes to what comes next there (resume after a pause).
  if (holder) {
    const where =
      holder.id === "device-dialog"
        ? "#device-dialog"
        : holder.dataset.site !== undefined
          ? "[data-site]"
          : `[data-group="${CSS.escape(holder.dataset.group)}"]`;
    const next = document.querySelector(`${where} ${action === "pause" ? "[data-unpause]" : "[data-pause]"}`);
    if (next) next.focus();
  }
}

// --- devices -------------------------------------------------------------------------------------------------

function deviceName(record) {
  return record.name || record.vendor || record.mac || record.address || record.client_id || record.key;
}

function seenRecordOf(deviceId) {
  return (state.devices || []).find((record) => record.device === deviceId) || null;
}

function configuredRecord(deviceId) {
  // A configured device as the site document has it, with what the device list says of it when it has answered.
  const device = state.doc.devices[deviceId];
  const seen = seenRecordOf(deviceId) || {};
  return {
    ...seen,
    key: seen.key || `device:${deviceId}`,
    device: deviceId,
    name: device.name || seen.name || deviceId,
    mac: seen.mac || device.macs[0] || null,
    address: seen.address || device.addresses[0] || null,
    effective: statusFor("device", deviceId),
  };
}

function renderDevices() {
  const list = $("#device-list");
  list.replaceChildren();
  if (state.devices === null) {
    $("#devices-summary").textContent = state.devicesError || "Loading…";
    return;
  }
  const records = [...state.devices].sort(
    (a, b) => Number(b.online) - Number(a.online) || deviceName(a).localeCompare(deviceName(b)),
  );
  const online = records.filter((record) => record.online).length;
  $("#devices-summary").textContent = `${records.length} devices, ${online} online now. Tap one to pause it.`;
  for (const record of records) {
    // The group is the one the server puts the device in (a device it does not know: the default group's).
    const group = record.group ? groupName(record.group) : null;
    const details = [record.device ? null : "New", record.vendor, group].filter(Boolean).join(" · ");
    list.append(
      h(
        "li",
        {},
        h(
          "button",
          {
            type: "button",
            class: "row",
            "data-key": record.key,
            "data-device": record.device || null,
            onclick: () => openDevice(record.key, record.device),
          },
          h("span", { class: `dot ${record.online ? "on" : "off"}`, "aria-hidden": "true" }),
          h(
            "span",
            { class: "row-main" },
            h("span", { class: "row-title", text: deviceName(record) }),
            h(
              "span",
              { class: "row-sub" },
              h("span", { class: "sr-only", text: record.online ? "Online. " : "Offline. " }),
              details || (record.online ? "Online" : "Not seen lately"),
            ),
          ),
          statusBadge(record.effective, "device"),
          h("span", { class: "chevron", "aria-hidden": "true", text: "›" }),
        ),
      ),
    );
  }
}

function openDevice(key, deviceId) {
  state.dialogDevice = { key, device: deviceId || null };
  renderDeviceDialog();
  const dialog = $("#device-dialog");
  if (!dialog.open) dialog.showModal();
}

function currentDialogRecord() {
  const { key, device } = state.dialogDevice;
  if (device && state.doc.devices[device]) return configuredRecord(device);
  const seen = (state.devices || []).find((record) => record.key === key);
  if (seen && seen.device && state.doc.devices[seen.device]) return configuredRecord(seen.device);
  return seen || null;
}

function renderDeviceDialog() {
  const body = $("#device-body");
  const record = currentDialogRecord();
  body.replaceChildren();
  if (!record) {
    $("#device-title").textContent = "Device";
    body.append(h("p", { text: "This device is no longer known." }));
    return;
  }
  const name = deviceName(record);
  $("#device-title").textContent = name;
  const facts = [
    ["Status", record.online ? "Online now" : record.last_seen ? `Last seen ${whenText(record.last_seen * 1000)}` : ""],
    ["Maker", record.vendor],
    ["Group", record.effective ? (record.effective.group ? groupName(record.effective.group) : "None") : null],
    ["Rules", record.effective ? rulesText(record.effective).replace(/^./, (first) => first.toUpperCase()) : null],
    ["Hardware address", record.mac],
    ["Address", record.address],
    ["Queries", record.queries !== undefined ? `${record.queries} (${record.blocked || 0} blocked)` : null],
  ].filter(([, value]) => value);
  const pairs = facts.map(([term, value]) => [h("dt", { text: term }), h("dd", { text: value })]);
  body.append(h("dl", { class: "facts" }, pairs));
  if (record.device) body.append(pauseControls("device", record.device, name));
  else {
    body.append(h("p", { class: "pause-state" }, statusBadge(record.effective, "device")));
    body.append(h("p", { class: "muted", text: "Give this device a name to pause it or give it rules." }));
  }

  const nameInput = h("input", {
    id: "device-name",
    type: "text",
    value: record.device ? state.doc.devices[record.device].name : "",
    autocomplete: "off",
    required: true,
    maxlength: 200,
  });
  const groups = Object.entries(state.doc.groups || {});
  // The group it is set to (a device not named yet: the one the server puts it in).
  const chosen = (record.device ? state.doc.devices[record.device].group : record.group) || "";
  const choice = (value, label) =>
    h(
      "label",
      { class: "check" },
      h("input", { type: "radio", name: "device-group", value, checked: chosen === value }),
      h("span", { text: label }),
    );
  const form = h(
    "form",
    { class: "stack box", id: "device-form" },
    h("h3", { text: record.device ? "Name and group" : "Name this device" }),
    h("label", { for: "device-name", text: "Name" }),
    nameInput,
    h(
      "fieldset",
      { class: "inline" },
      h("legend", { text: "Group" }),
      choice("", "None"),
      groups.map(([id, group]) => choice(id, group.name || id)),
    ),
    h("button", { type: "submit", class: "primary", text: "Save" }),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    saveDevice(record, nameInput.value.trim(), form.querySelector("input[name=device-group]:checked").value || null);
  });
  body.append(form);

  const links = h("div", { class: "actions" });
  if (record.device && state.doc.mode !== "network") {
    const rules = () => {
      $("#device-dialog").close();
      openRules("device", record.device, name);
    };
    links.append(h("button", { type: "button", "data-action": "device-rules", onclick: rules }, "Rules and schedules"));
  }
  if (state.devices !== null) {
    const activity = () => {
      $("#device-dialog").close();
      state.activityDevice = record.key;
      showTab("activity");
    };
    links.append(h("button", { type: "button", "data-action": "device-activity", onclick: activity }, "Activity"));
  }
  body.append(links);
}

async function saveDevice(record, name, group) {
  if (!name) return say("Give the device a name.", true);
  try {
    if (record.device) {
      written(await api("PUT", targetPath("device", record.device), { name, group }));
    } else {
      written(await api("PATCH", sitePath(`/devices/seen/${encodeURIComponent(record.key)}`), { name, group }));
    }
    say(`Saved ${name}.`);
  } catch (error) {
    say(error.message, true);
  }
  await loadLive();
  render();
}

// --- groups --------------------------------------------------------------------------------------------------

function renderGroups() {
  const list = $("#group-list");
  list.replaceChildren();
  const doc = state.doc;
  const networkMode = doc.mode === "network";
  const whole = h(
    "article",
    { class: "card", "data-site": doc.id },
    h("h3", { text: "Whole network" }),
    h("p", { class: "muted small", text: "Every device, known or not." }),
    pauseControls("site", null, "the whole network"),
    networkMode ? rulesButton("site", null, "the whole network") : null,
  );
  list.append(whole);
  if (networkMode) {
    const note = "This network has one set of rules for every device; groups share its pauses only.";
    list.append(h("p", { class: "muted", text: note }));
  }
  // Members as the server has them (the group each device's status names), with the statuses it gave.
  const devices = Object.entries(doc.devices || {});
  const groupIn = (id) => (statusFor("device", id) || { group: null }).group;
  for (const [id, group] of Object.entries(doc.groups || {})) {
    const name = group.name || id;
    const members = state.status ? devices.filter(([deviceId]) => groupIn(deviceId) === id) : null;
    list.append(
      h(
        "article",
        { class: "card", "data-group": id },
        h("h3", { text: name }),
        doc.default_group === id ? h("p", { class: "muted small", text: "New devices join this group." }) : null,
        pauseControls("group", id, name),
        memberList(members),
        networkMode ? null : rulesButton("group", id, name),
      ),
    );
  }
  const loose = state.status ? devices.filter(([deviceId]) => !groupIn(deviceId)) : [];
  if (loose.length) {
    const card = h("article", { class: "card", "data-group": "" }, h("h3", { text: "Not in a group" }));
    card.append(memberList(loose));
    list.append(card);
  }
}

function memberList(members) {
  if (members === null) return h("p", { class: "muted small", text: state.statusError || "Loading…" });
  if (!members.length) return h("p", { class: "muted small", text: "No devices in this group yet." });
  return h(
    "ul",
    { class: "members", "aria-label": "Devices" },
    members.map(([id, device]) =>
      h(
        "li",
        {},
        h(
          "button",
          { type: "button", class: "member", "data-device": id, onclick: () => openDevice(`device:${id}`, id) },
          h("span", { class: "row-title", text: device.name || id }),
          statusBadge(statusFor("device", id), "device"),
          h("span", { class: "chevron", "aria-hidden": "true", text: "›" }),
        ),
      ),
    ),
  );
}

function rulesButton(kind, id, name) {
  const open = () => openRules(kind, id, name);
  return h("button", { type: "button", "data-action": "rules", text: "Rules and schedules", onclick: open });
}

// --- rules: categories, schedules, allow and deny ------------------------------------------------------------

function policyOf(kind, id) {
  if (kind === "site") return state.doc.policy;
  if (kind === "group") return groupOf(id).policy;
  return state.doc.devices[id].policy;
}

function rulesNote(kind, id) {
  // Whose rules apply while it has none of its own: the level the server says governs it.
  if (kind !== "device") {
    return `These are the default rules. Saving makes them this ${kind === "site" ? "network" : "group"}'s own.`;
  }
  return `This device follows ${rulesText(statusFor(kind, id))}. Saving gives it rules of its own.`;
}

let scheduleCount = 0;

function openRules(kind, id, name) {
  state.rulesTarget = { kind, id, name };
  const policy = policyOf(kind, id) || {};
  $("#rules-title").textContent = `Rules for ${name}`;
  $("#rules-timezone").textContent = zone();
  $("#rules-note").textContent = policyOf(kind, id) ? "" : rulesNote(kind, id);
  const blocked = new Set(policy.block || state.categories.filter((c) => c.action === "block").map((c) => c.id));
  const categories = $("#rules-categories");
  categories.replaceChildren(
    ...state.categories.map((category) =>
      h(
        "label",
        { class: "check" },
        h("input", { type: "checkbox", name: "category", value: category.id, checked: blocked.has(category.id) }),
        h(
          "span",
          {},
          h("strong", { text: category.title }),
          " ",
          h("span", { class: "muted small", text: category.description }),
        ),
      ),
    ),
  );
  $("#rules-web-protect").checked = policy.web_protect !== false;
  $("#rules-safe-search").checked = Boolean(policy.safe_search);
  $("#rules-canaries").checked = policy.canaries !== false;
  $("#rules-allow").value = (policy.allow || []).join("\n");
  $("#rules-deny").value = (policy.deny || []).join("\n");
  $("#rules-schedules").replaceChildren(...(policy.schedules || []).map(scheduleEditor));
  $("#rules-error").hidden = true;
  showTab("rules");
}

function timeField(id, label, className, value) {
  return h(
    "div",
    { class: "field" },
    h("label", { for: id, text: label }),
    h("input", { id, class: className, type: "time", value, required: true }),
  );
}

function scheduleEditor(schedule) {
  const n = ++scheduleCount;
  const field = (suffix) => `schedule-${n}-${suffix}`;
  const categories = schedule.block === "all" ? [] : schedule.block;
  const blockChoice = (value, label) =>
    h(
      "label",
      { class: "check" },
      h("input", {
        type: "radio",
        name: field("block"),
        value,
        checked: (schedule.block === "all") === (value === "all"),
      }),
      h("span", { text: label }),
    );
  const editor = h(
    "fieldset",
    { class: "schedule", "data-schedule": n },
    h("legend", { text: schedule.name || "New schedule" }),
    h("label", { for: field("name"), text: "Name" }),
    h("input", {
      id: field("name"),
      class: "schedule-name",
      type: "text",
      value: schedule.name,
      maxlength: 64,
      autocomplete: "off",
    }),
    h(
      "fieldset",
      { class: "inline days" },
      h("legend", { text: "Days" }),
      DAYS.map((day) =>
        h(
          "label",
          { class: "check day" },
          h("input", { type: "checkbox", name: field("days"), value: day, checked: schedule.days.includes(day) }),
          h("span", { text: DAY_NAMES[day] }),
        ),
      ),
    ),
    h(
      "div",
      { class: "times" },
      timeField(field("from"), "From", "schedule-from", schedule.from),
      timeField(field("to"), "To", "schedule-to", schedule.to),
    ),
    h(
      "fieldset",
      { class: "inline" },
      h("legend", { text: "During it, block" }),
      blockChoice("all", "Everything"),
      blockChoice("categories", "These kinds of sites:"),
    ),
    h(
      "div",
      { class: "checks schedule-categories" },
      state.categories.map((category) =>
        h(
          "label",
          { class: "check" },
          h("input", {
            type: "checkbox",
            name: field("categories"),
            value: category.id,
            checked: categories.includes(category.id),
          }),
          h("span", { text: category.title }),
        ),
      ),
    ),
    h("button", {
      type: "button",
      class: "quiet",
      "data-action": "remove-schedule",
      text: "Remove this schedule",
      onclick: () => editor.remove(),
    }),
  );
  const name = editor.querySelector(".schedule-name");
  name.addEventListener("input", () => {
    editor.querySelector("legend").textContent = name.value || "New schedule";
  });
  const chooser = editor.querySelector(".schedule-categories");
  const showCategories = () => {
    chooser.hidden = editor.querySelector(`input[name="${field("block")}"][value="all"]`).checked;
  };
  for (const radio of editor.querySelectorAll(`input[name="${field("block")}"]`)) {
    radio.addEventListener("change", showCategories);
  }
  showCategories();
  return editor;
}

function readSchedule(editor) {
  const n = editor.dataset.schedule;
  const checked = (name) =>
    [...editor.querySelectorAll(`input[name="schedule-${n}-${name}"]:checked`)].map((box) => box.value);
  const all = checked("block")[0] !== "categories";
  return {
    name: editor.querySelector(".schedule-name").value.trim(),
    days: checked("days"),
    from: editor.querySelector(".schedule-from").value,
    to: editor.querySelector(".schedule-to").value,
    block: all ? "all" : checked("categories"),
  };
}

function names(text) {
  return text
    .split(/[\s,]+/)
    .map((name) => name.trim().toLowerCase())
    .filter(Boolean);
}

async function saveRules(event) {
  event.preventDefault();
  const { kind, id, name } = state.rulesTarget;
  const before = policyOf(kind, id) || {};
  const policy = {
    ...before, // what this page does not show (a profile, the kind of blocked answer) is kept
    block: [...document.querySelectorAll("#rules-categories input:checked")].map((box) => box.value),
    web_protect: $("#rules-web-protect").checked,
    safe_search: $("#rules-safe-search").checked,
    canaries: $("#rules-canaries").checked,
    allow: names($("#rules-allow").value),
    deny: names($("#rules-deny").value),
    schedules: [...document.querySelectorAll("#rules-schedules .schedule")].map(readSchedule),
  };
  const error = $("#rules-error");
  error.hidden = true;
  try {
    written(await api("PUT", `${targetPath(kind, id)}/policy`, policy));
    say(`Saved the rules for ${name}.`);
    await loadLive();
    openRules(kind, id, name);
  } catch (failure) {
    error.textContent = failure.field ? `${explainField(failure.field)}: ${failure.message}` : failure.message;
    error.hidden = false;
    error.focus();
  }
}

function explainField(field) {
  const found = field.match(/schedules\[(\d+)\]\.?(\w*)/);
  if (found) return `Schedule ${Number(found[1]) + 1}${found[2] ? ` (${found[2]})` : ""}`;
  if (/\.allow\[/.test(field)) return "Always allow";
  if (/\.deny\[/.test(field)) return "Always block";
  return field;
}

async function clearRules() {
  const { kind, id, name } = state.rulesTarget;
  try {
    written(await api("DELETE", `${targetPath(kind, id)}/policy`));
    say(`${name} has no rules of its own now.`);
    await loadLive();
    openRules(kind, id, name);
  } catch (error) {
    say(error.message, true);
  }
}

// --- activity ------------------------------------------------------------------------------------------------

function renderActivityChoices() {
  const select = $("#activity-device");
  select.replaceChildren(
    h("option", { value: "", text: "The whole network" }),
    ...(state.devices || []).map((record) => h("option", { value: record.key, text: deviceName(record) })),
  );
  const known = [...select.options].some((option) => option.value === state.activityDevice);
  select.value = known ? state.activityDevice : "";
}

async function renderActivity() {
  const body = $("#activity-body");
  if (state.devices === null) {
    body.replaceChildren(h("p", { class: "muted", text: state.devicesError || "Loading…" }));
    return;
  }
  renderActivityChoices();
  const device = $("#activity-device").value;
  const hours = Number(document.querySelector("input[name=activity-hours]:checked").value);
  const query = new URLSearchParams({ hours: String(hours) });
  if (device) query.set("device", device);
  let data;
  try {
    data = await api("GET", `${sitePath("/activity")}?${query}`);
  } catch (error) {
    body.replaceChildren(h("p", { class: "error", text: error.message }));
    return;
  }
  const slots = new Map(data.hours.map((hour) => [Date.parse(hour.hour), hour]));
  const now = Math.floor(Date.now() / 3600000) * 3600000;
  const columns = [];
  let allowed = 0;
  let blocked = 0;
  let peak = 1;
  for (let at = now - (hours - 1) * 3600000; at <= now; at += 3600000) {
    const slot = slots.get(at) || { allowed: 0, blocked: 0, warned: 0 };
    allowed += slot.allowed + (slot.warned || 0);
    blocked += slot.blocked;
    peak = Math.max(peak, slot.allowed + slot.blocked + (slot.warned || 0));
    columns.push([at, slot]);
  }
  const period = hours === 24 ? "the last 24 hours" : "the last 7 days";
  const chart = h("div", { class: "chart", "aria-hidden": "true" });
  for (const [at, slot] of columns) {
    const total = slot.allowed + slot.blocked + (slot.warned || 0);
    const bar = h("span", { class: "bar", title: `${clock(at, true)}: ${total} queries, ${slot.blocked} blocked` });
    const blockedPart = h("span", { class: "bar-blocked" });
    bar.style.height = `${(100 * total) / peak}%`;
    blockedPart.style.height = total ? `${(100 * slot.blocked) / total}%` : "0";
    bar.append(blockedPart);
    chart.append(bar);
  }
  const table = h(
    "table",
    { class: "hours" },
    h("caption", { text: "Hours with traffic" }),
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        h("th", { scope: "col", text: "Hour" }),
        h("th", { scope: "col", text: "Allowed" }),
        h("th", { scope: "col", text: "Blocked" }),
      ),
    ),
    h(
      "tbody",
      {},
      [...data.hours].reverse().map((hour) =>
        h(
          "tr",
          {},
          h("th", { scope: "row", text: clock(Date.parse(hour.hour), true) }),
          h("td", { text: hour.allowed + (hour.warned || 0) }),
          h("td", { text: hour.blocked }),
        ),
      ),
    ),
  );
  body.replaceChildren(
    h(
      "p",
      { class: "totals" },
      h("strong", { text: `${allowed + blocked}` }),
      " queries, ",
      h("strong", { text: `${blocked}` }),
      " blocked",
    ),
    h(
      "figure",
      { class: "chart-box" },
      chart,
      h(
        "div",
        { class: "chart-axis muted small", "aria-hidden": "true" },
        h("span", { text: hours === 24 ? "24 hours ago" : "7 days ago" }),
        h("span", { text: "now" }),
      ),
      h("figcaption", { class: "muted small", text: `Queries per hour, ${period}; the blocked part in red.` }),
    ),
    h("h3", { text: "Most blocked" }),
    data.top_blocked.length
      ? h(
          "ol",
          { class: "top-list" },
          data.top_blocked.map((entry) =>
            h("li", {}, h("span", { class: "name", text: entry.name }), h("span", { class: "count" }, entry.count)),
          ),
        )
      : h("p", { class: "muted", text: "Nothing was blocked." }),
    h("details", {}, h("summary", { text: "Show the hours as a table" }), table),
  );
}

// --- alerts --------------------------------------------------------------------------------------------------

async function renderAlerts() {
  const list = $("#alert-list");
  let alerts;
  try {
    const data = await api("GET", sitePath("/alerts"));
    alerts = data.alerts;
  } catch (error) {
    list.replaceChildren(h("li", { class: "error", text: error.message }));
    return;
  }
  if (!alerts.length) {
    list.replaceChildren(h("li", { class: "muted empty", text: "No alerts. Nothing suspicious was seen." }));
    return;
  }
  const byKey = new Map((state.devices || []).map((record) => [record.key, deviceName(record)]));
  const byAddress = new Map();
  for (const [id, device] of Object.entries(state.doc.devices || {})) {
    for (const address of device.addresses || []) byAddress.set(address, device.name || id);
  }
  const who = (alert) => byKey.get(alert.device) || byAddress.get(alert.client) || alert.client;
  list.replaceChildren(
    ...alerts.map((alert) =>
      h(
        "li",
        { class: "alert", "data-reason": alert.reason },
        h("span", { class: `badge alert-${alert.reason}`, text: REASONS[alert.reason] || alert.reason }),
        h(
          "span",
          { class: "row-main" },
          h("span", { class: "row-title name", text: alert.name }),
          h("span", { class: "row-sub", text: [who(alert), alert.detail].filter(Boolean).join(" · ") }),
        ),
        h("time", { datetime: new Date(alert.at * 1000).toISOString(), text: whenText(alert.at * 1000) }),
      ),
    ),
  );
}

// --- views ---------------------------------------------------------------------------------------------------

function showTab(tab) {
  state.tab = tab;
  if (!state.token) return Promise.resolve(); // signed out meanwhile: the sign-in panel stays alone
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `view-${tab}`;
  for (const button of document.querySelectorAll("#tabs button")) {
    const here = button.dataset.tab === tab || (tab === "rules" && button.dataset.tab === "groups");
    if (here) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  return render();
}

function render() {
  if (!state.token || !state.doc) return Promise.resolve();
  if (state.tab === "devices") renderDevices();
  if (state.tab === "groups") renderGroups();
  if ($("#device-dialog").open) renderDeviceDialog();
  if (state.tab === "activity") return renderActivity();
  if (state.tab === "alerts") return renderAlerts();
  return Promise.resolve();
}

async function refresh() {
  await loadAll();
  await render();
}

function start() {
  takeTokenFromAddress();
  for (const button of document.querySelectorAll("#tabs button")) {
    button.addEventListener("click", () => showTab(button.dataset.tab));
  }
  for (const button of document.querySelectorAll("[data-action=refresh]")) button.addEventListener("click", refresh);
  $("#login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = tokenFromText($("#login-link").value);
    if (token) signIn(token);
    else $("#login-reason").textContent = "That is not a sign-in link of this network.";
  });
  $("#sign-out").addEventListener("click", () => showLogin("Signed out. Open your sign-in link to come back."));
  $("#device-close").addEventListener("click", () => $("#device-dialog").close());
  $("#rules-form").addEventListener("submit", saveRules);
  $("#rules-clear").addEventListener("click", clearRules);
  $("#rules-back").addEventListener("click", () => showTab("groups"));
  $("#add-schedule").addEventListener("click", () => {
    const editor = scheduleEditor({
      name: "Bedtime",
      days: ["sun", "mon", "tue", "wed", "thu"],
      from: "21:00",
      to: "07:00",
      block: "all",
    });
    $("#rules-schedules").append(editor);
    editor.querySelector(".schedule-name").focus();
  });
  $("#activity-form").addEventListener("change", () => {
    state.activityDevice = $("#activity-device").value;
    renderActivity();
  });
  setInterval(() => {
    const idle = !$("#device-dialog").open && state.tab !== "rules"; // never under a finger or an edit
    if (state.token && document.visibilityState === "visible" && idle) refresh();
  }, 30000);
  // A sign-in link opened where the app is already open changes the fragment only: no new page load.
  window.addEventListener("hashchange", () => {
    if (!location.hash.startsWith("#token=")) return;
    takeTokenFromAddress();
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) signIn(token);
  });
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) signIn(token, true);
  else showLogin();
}

start();
