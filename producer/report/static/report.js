(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("imgq-data").textContent);
  var models = data.models, labels = data.labels, images = data.images;
  var nm = models.length;
  var state = {page: 0, size: data.pageSize, q: "", failOnly: false, differOnly: false};
  var filtered = null, search = null;
  var $ = function (id) { return document.getElementById(id); };
  var grid = $("grid"), qBox = $("q"), failBox = $("fail"), differBox = $("differ");
  var sizeSel = $("size"), pageBox = $("page"), countEl = $("count");
  var prevs = [$("prev"), $("prev2")], nexts = [$("next"), $("next2")];

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function pct(s) {
    if (s > 0 && s < 0.0005) { return "<0.1%"; }
    return (s * 100).toFixed(1) + "%";
  }
  function failed(img) {
    for (var i = 0; i < nm; i++) {
      var r = img[2][i];
      if (r === null || !Array.isArray(r)) { return true; }
    }
    return false;
  }
  function searchText(i) {
    if (search === null) { search = new Array(images.length); }
    if (search[i] === undefined) {
      var img = images[i], parts = [img[0]];
      for (var m = 0; m < nm; m++) {
        var r = img[2][m];
        if (Array.isArray(r)) {
          for (var k = 0; k < r.length; k++) { parts.push(labels[r[k][0]]); }
        } else if (r) { parts.push(r.c); }
      }
      search[i] = parts.join("\n").toLowerCase();
    }
    return search[i];
  }
  function refilter() {
    var q = state.q.trim().toLowerCase();
    var out = [];
    for (var i = 0; i < images.length; i++) {
      var img = images[i];
      if (state.failOnly && !failed(img)) { continue; }
      if (state.differOnly && img[3] !== false) { continue; }
      if (q && searchText(i).indexOf(q) < 0) { continue; }
      out.push(i);
    }
    filtered = out;
  }
  function pages() { return Math.max(1, Math.ceil(filtered.length / state.size)); }

  function header() {
    var frag = document.createDocumentFragment();
    frag.appendChild(el("div", "hd", "Image"));
    for (var m = 0; m < nm; m++) {
      var h = el("div", m === nm - 1 ? "hd last" : "hd");
      h.appendChild(el("span", "mname", models[m].name));
      h.appendChild(document.createTextNode(" (" + models[m].caption + ")"));
      frag.appendChild(h);
    }
    return frag;
  }
  function imageCell(img) {
    var c = el("div", "cell img");
    if (img[1]) {
      var t = el("img", "thumb");
      t.alt = img[0];
      t.src = "data:image/jpeg;base64," + img[1];
      c.appendChild(t);
    } else {
      c.appendChild(el("div", "thumb ph", "no preview"));
    }
    var n = el("div", "name", img[0]);
    n.title = img[0];
    c.appendChild(n);
    if (img[3] === true) { c.appendChild(el("span", "badge agree", "top-1 agrees")); }
    else if (img[3] === false) { c.appendChild(el("span", "badge differ", "top-1 differs")); }
    if (failed(img)) {
      c.appendChild(document.createTextNode(" "));
      c.appendChild(el("span", "badge fail", "failed"));
    }
    return c;
  }
  function modelCell(r) {
    var c = el("div", "cell model");
    if (r === null) {
      c.appendChild(el("div", "missing", "no result"));
    } else if (!Array.isArray(r)) {
      var e = el("div", "err");
      e.appendChild(el("div", "code", r.c));
      e.appendChild(el("p", "msg", r.m));
      c.appendChild(e);
    } else {
      for (var k = 0; k < r.length; k++) {
        var p = r[k], label = labels[p[0]];
        var d = el("div", "pred" + (k === 0 ? " top" : "") + (p[3] ? " m" : ""));
        var line = el("div", "pl");
        var l = el("span", "lbl", label);
        l.title = label + " (class " + p[1] + ")";
        line.appendChild(l);
        line.appendChild(el("span", "pct", pct(p[2])));
        d.appendChild(line);
        var track = el("div", "track"), fill = el("div", "fill");
        fill.style.width = Math.max(0, Math.min(100, p[2] * 100)).toFixed(2) + "%";
        track.appendChild(fill);
        d.appendChild(track);
        c.appendChild(d);
      }
    }
    return c;
  }
  function render() {
    if (filtered === null) { refilter(); }
    var np = pages();
    if (state.page >= np) { state.page = np - 1; }
    if (state.page < 0) { state.page = 0; }
    var start = state.page * state.size;
    var slice = filtered.slice(start, start + state.size);
    grid.textContent = "";
    grid.appendChild(header());
    var frag = document.createDocumentFragment();
    for (var s = 0; s < slice.length; s++) {
      var img = images[slice[s]];
      var cells = [imageCell(img)];
      for (var m = 0; m < nm; m++) { cells.push(modelCell(img[2][m])); }
      for (var x = 0; x < cells.length; x++) {
        if (s === slice.length - 1) { cells[x].className += " row-last"; }
        frag.appendChild(cells[x]);
      }
    }
    if (!slice.length) { frag.appendChild(el("div", "empty", "No images match.")); }
    grid.appendChild(frag);
    pageBox.value = String(state.page + 1);
    pageBox.max = String(np);
    var info = "page " + (state.page + 1) + " of " + np;
    $("pages").textContent = "of " + np;
    $("pages2").textContent = "Page " + (state.page + 1) + " of " + np;
    countEl.textContent = filtered.length === images.length
      ? images.length.toLocaleString("en-US") + " images"
      : filtered.length.toLocaleString("en-US") + " of " +
        images.length.toLocaleString("en-US") + " images";
    for (var i = 0; i < 2; i++) {
      prevs[i].disabled = state.page === 0;
      nexts[i].disabled = state.page >= np - 1;
    }
    document.body.setAttribute("data-page", info);
    toolbarHeight();
  }
  function go(p) { state.page = p; render(); }
  function refresh() { filtered = null; state.page = 0; render(); }

  var timer = null;
  qBox.addEventListener("input", function () {
    if (timer !== null) { clearTimeout(timer); }
    timer = setTimeout(function () { timer = null; state.q = qBox.value; refresh(); }, 150);
  });
  failBox.addEventListener("change", function () { state.failOnly = failBox.checked; refresh(); });
  differBox.addEventListener("change", function () {
    state.differOnly = differBox.checked; refresh();
  });
  sizeSel.addEventListener("change", function () {
    var first = state.page * state.size;
    state.size = parseInt(sizeSel.value, 10) || data.pageSize;
    go(Math.floor(first / state.size));
  });
  pageBox.addEventListener("change", function () {
    var p = parseInt(pageBox.value, 10);
    go(isNaN(p) ? state.page : p - 1);
  });
  function step(d) {
    var before = state.page;
    go(state.page + d);
    if (state.page !== before) { window.scrollTo(0, grid.offsetTop - 60); }
  }
  prevs.forEach(function (b) { b.addEventListener("click", function () { step(-1); }); });
  nexts.forEach(function (b) { b.addEventListener("click", function () { step(1); }); });
  document.addEventListener("keydown", function (ev) {
    var t = ev.target && ev.target.tagName;
    if (t === "INPUT" || t === "SELECT" || t === "TEXTAREA") { return; }
    if (ev.altKey || ev.ctrlKey || ev.metaKey) { return; }
    if (ev.key === "ArrowRight") { go(state.page + 1); }
    else if (ev.key === "ArrowLeft") { go(state.page - 1); }
  });
  var sizes = [25, 50, 100, 250, 500];
  if (sizes.indexOf(state.size) < 0) {
    sizes.push(state.size);
    sizes.sort(function (a, b) { return a - b; });
  }
  sizes.forEach(function (n) {
    var o = el("option", null, n + " per page");
    o.value = String(n);
    if (n === state.size) { o.selected = true; }
    sizeSel.appendChild(o);
  });
  var cols = "180px";
  for (var m = 0; m < nm; m++) { cols += " minmax(240px, 1fr)"; }
  grid.style.setProperty("--cols", cols);
  function toolbarHeight() {
    document.documentElement.style.setProperty("--tb", $("toolbar").offsetHeight + "px");
  }
  window.addEventListener("resize", toolbarHeight);
  toolbarHeight();
  render();
  document.body.setAttribute("data-ready", "1");
})();
