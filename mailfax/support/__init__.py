"""Small helpers shared by several rooms: waiting, safe XML, ASCII text for fax fields."""
