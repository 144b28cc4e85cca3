"""The LazyConfig loop's public names (``eapm.engine.lazy``, the loop itself), importable as
``eapm.lazy``."""

from .engine.lazy import (  # noqa: F401
    __all__,
    build_model,
    build_optimizer,
    build_trainer,
    clip_gradients,
    do_test,
    do_train,
    is_lazy_config,
    load_lazy_config,
    main,
    preemption_kwargs,
    setup,
)
