"""A user's own model, for the tests of models given as an import path (``tests_pkg.mod:factory``)."""
