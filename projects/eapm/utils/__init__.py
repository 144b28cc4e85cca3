"""Helpers shared by the tests and the tools: tiny configs, synthetic batches and
``HostSyncCounter`` (``eapm.utils.testing``), the reading of training output folders
(``eapm.utils.results``), and the measuring and reporting harness of
``tools/benchmark.py`` (``eapm.utils.benchmark``)."""
