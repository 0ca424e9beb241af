CREATE TABLE widgets (
    id    BIGSERIAL PRIMARY KEY,
    name  TEXT NOT NULL
);
CREATE TABLE effects (
    id        BIGSERIAL PRIMARY KEY,
    event_id  TEXT NOT NULL
);
