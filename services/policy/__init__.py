"""The policy service: tenants' spending rules as versioned data, evaluated and signed for devices."""
