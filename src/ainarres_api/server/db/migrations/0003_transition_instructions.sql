-- 0003: transitions carry instructions too.
--
-- A stage's card says what its holder must do; a way out of it may say when to take it and what
-- to leave behind (e.g. "reject to todo: name the failing check in the reason"). Markdown, shown
-- in the card of the transition's source stage. Existing transitions get the empty text.
ALTER TABLE transitions ADD COLUMN instructions text NOT NULL DEFAULT '';
