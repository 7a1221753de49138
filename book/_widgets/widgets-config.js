// The widget bundle (embed-amd.js) loads its icon fonts from "@jupyter-widgets/html-manager/dist/": point that
// at this folder (the book's _static), so the fonts come from the book itself, not from a CDN.
(function () {
  var here = document.currentScript.src.replace(/[^\/]*$/, "").replace(/\/$/, "");
  require.config({ paths: { "@jupyter-widgets/html-manager/dist": here } });
})();
