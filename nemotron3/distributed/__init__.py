"""Scale-out: FSDP2 on a DeviceMesh (`parallel`) and expert parallelism over its ranks (`expert_parallel`)."""
