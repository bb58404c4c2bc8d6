"""Pure rendering: values in, a figure, a terminal table or an HTML page out. Nothing here
reads a store; the layers above hand it what to draw."""
