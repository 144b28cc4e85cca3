"""Helpers shared by the tests and the tools: tiny configs and synthetic batches
(``eapm.utils.testing``) and the reading of training output folders
(``eapm.utils.results``)."""
