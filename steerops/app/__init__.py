"""The application: the ``steerops`` command (CLI, its argument types, the commands),
the HTML and PNG reports, the tiny offline model. Nothing in the library imports it."""
