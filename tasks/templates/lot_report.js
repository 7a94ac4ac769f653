/* Progressive enhancement of the table of every image: click-to-sort headers (buttons, so the
   keyboard works too) and a filter box. Without it the table is complete, highest score first. */
(function () {
  "use strict";
  var table = document.getElementById("all-images");
  if (!table || !table.tBodies.length) { return; }
  var body = table.tBodies[0];
  var heads = table.tHead.rows[0].cells;
  var status = document.getElementById("table-status");

  function value(row, i, type) {
    var cell = row.cells[i];
    var v = cell.getAttribute("data-value");
    if (v === null) { v = cell.textContent.trim(); }
    if (type === "num") { return v === "" ? null : parseFloat(v); }
    return v.toLowerCase();
  }

  function sortBy(i, dir) {
    var type = heads[i].getAttribute("data-type");
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = value(a, i, type), y = value(b, i, type);
      if (x === null || y === null) { return x === y ? 0 : (x === null ? 1 : -1); }
      var r = type === "num" ? x - y : x.localeCompare(y, undefined, {numeric: true});
      return dir === "ascending" ? r : -r;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(heads, function (th) { th.removeAttribute("aria-sort"); });
    heads[i].setAttribute("aria-sort", dir);
    if (status) { status.textContent = "Sorted by " + heads[i].textContent.trim() + ", " + dir + "."; }
  }

  Array.prototype.forEach.call(heads, function (th, i) {
    var type = th.getAttribute("data-type");
    if (!type) { return; }
    var button = document.createElement("button");
    button.type = "button";
    button.className = "sort";
    while (th.firstChild) { button.appendChild(th.firstChild); }
    th.appendChild(button);
    button.addEventListener("click", function () {
      var now = th.getAttribute("aria-sort");
      var dir = now === "ascending" ? "descending" : now === "descending" ? "ascending"
        : (type === "num" ? "descending" : "ascending");
      sortBy(i, dir);
    });
  });

  var filters = document.getElementById("table-filters");
  var text = document.getElementById("filter-text");
  var verdict = document.getElementById("filter-verdict");
  if (!filters || !text || !verdict) { return; }
  filters.hidden = false;
  function apply() {
    var q = text.value.trim().toLowerCase(), v = verdict.value, shown = 0;
    Array.prototype.forEach.call(body.rows, function (row) {
      var ok = (!v || row.getAttribute("data-verdict") === v) &&
        (!q || row.textContent.toLowerCase().indexOf(q) !== -1);
      row.hidden = !ok;
      if (ok) { shown += 1; }
    });
    if (status) { status.textContent = "Showing " + shown + " of " + body.rows.length + " images."; }
  }
  text.addEventListener("input", apply);
  verdict.addEventListener("change", apply);
}());
