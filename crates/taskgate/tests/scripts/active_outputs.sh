#!/bin/sh
# Outputs a browser would run if it opened them on the server's origin, beside passive ones.
cd "$TASKGATE_OUTPUT_DIR" || exit 1
printf '<html><script>alert(document.cookie)</script></html>' > page.html
printf '<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>' > drawing.svg
printf 'alert(1)' > code.js
printf '<?xml version="1.0"?><x/>' > doc.xml
printf 'plain words' > notes.txt
printf '\211PNG\r\n\032\n' > picture.png
