"""FSDP2 through Trainer + accelerate on CPU processes, for the two-process tests."""


def allow_fsdp_on_cpu() -> None:
    """accelerate turns FSDP on only for accelerators (CPU processes stay MULTI_CPU); lift that one
    check so that the Trainer + accelerate FSDP2 path runs here as it does on GPUs."""
    import accelerate.state
    from accelerate.utils import DistributedType

    original = accelerate.state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":  # as accelerate does on accelerators
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    accelerate.state.AcceleratorState.__init__ = init
