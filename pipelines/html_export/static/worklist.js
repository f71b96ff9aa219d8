/* slidepipe worklist: sort the rows by a clicked column header and filter them, offline.
 *
 * Every row carries its sort values as data attributes (data-name, data-grade,
 * data-probability, data-risk, data-qc, data-rank); the page arrives sorted by risk, highest
 * first. */
(function () {
  "use strict";

  const table = document.getElementById("worklist");
  const body = table.tBodies[0];
  const headers = Array.from(table.querySelectorAll("th[data-sort-key]"));
  const textFilter = document.getElementById("filter-text");
  const gradeFilter = document.getElementById("filter-grade");
  const qcFilter = document.getElementById("filter-qc");
  const shownCount = document.getElementById("shown-count");

  function sortValue(row, key, type) {
    const raw = row.dataset[key] || "";
    if (type === "number") {
      const number = parseFloat(raw);
      return Number.isNaN(number) ? null : number;
    }
    return raw.toLocaleLowerCase();
  }

  function compare(a, b, type) {
    if (a === b) return 0;
    if (a === null) return 1;  // missing values last in either direction
    if (b === null) return -1;
    return type === "number" ? a - b : a.localeCompare(b, undefined, {numeric: true});
  }

  function sortRows(header, descending) {
    const key = header.dataset.sortKey;
    const type = header.dataset.sortType;
    const rows = Array.from(body.rows).map((row, index) => ({row, index, value: sortValue(row, key, type)}));
    rows.sort((a, b) => {
      if (a.value === null || b.value === null) {
        return compare(a.value, b.value, type) || a.index - b.index;
      }
      const order = compare(a.value, b.value, type);
      return (descending ? -order : order) || a.index - b.index;
    });
    rows.forEach(item => body.appendChild(item.row));
    headers.forEach(h => h.setAttribute("aria-sort", "none"));
    header.setAttribute("aria-sort", descending ? "descending" : "ascending");
  }

  headers.forEach(header => {
    header.querySelector("button").addEventListener("click", () => {
      const current = header.getAttribute("aria-sort");
      // first click: numbers high to low, text A to Z; next clicks reverse
      const descending = current === "none" ? header.dataset.sortType === "number"
                                            : current === "ascending";
      sortRows(header, descending);
    });
  });

  function applyFilters() {
    const text = textFilter.value.trim().toLocaleLowerCase();
    const grade = gradeFilter.value;
    const qc = qcFilter.value;
    let shown = 0;
    for (const row of body.rows) {
      const visible = (!text || row.dataset.name.toLocaleLowerCase().includes(text)) &&
                      (!grade || row.dataset.grade === grade) &&
                      (!qc || row.dataset.qc === qc);
      row.hidden = !visible;
      shown += visible ? 1 : 0;
    }
    shownCount.value = shown + " of " + body.rows.length + " shown";
  }

  textFilter.addEventListener("input", applyFilters);
  gradeFilter.addEventListener("change", applyFilters);
  qcFilter.addEventListener("change", applyFilters);
  applyFilters();
}());
