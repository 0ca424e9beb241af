"""devicehub: the device registry, the device stream, sync, online and offline payments, access,
cabinets, alarms and rollouts."""
