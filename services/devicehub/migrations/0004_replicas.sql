-- Several hub replicas (docs/devicehub.md, "Replicas"): a device's stream may end on one replica
-- after the device came back on another. The stream that last put the device online (hello or
-- heartbeat), whichever replica holds it; a stream's end puts the device offline only while it is
-- still that stream.
ALTER TABLE devices ADD COLUMN stream_id UUID;
